// MathJax 3 configuration for pymdownx.arithmatex (generic mode): typeset only the
// elements arithmatex marks, with \( \) inline and \[ \] display delimiters.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Re-typeset after Material's instant navigation swaps the page content. document$ also emits
// once for the initial page, which MathJax's startup already typesets: skip that emission.
if (typeof document$ !== "undefined") {
  let initialPage = true;
  document$.subscribe(() => {
    if (initialPage) {
      initialPage = false;
      return;
    }
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      // Chain on MathJax's own promise so this never races its first typeset. No
      // output.clearCache(): in MathJax 3.2.2 it drops the CHTML per-character CSS rules and
      // the re-typeset does not restore them, so every formula renders as blank space.
      MathJax.startup.promise = MathJax.startup.promise.then(() => {
        MathJax.typesetClear();
        MathJax.texReset();
        return MathJax.typesetPromise();
      });
    }
  });
}
