// Records every script error, unhandled rejection, failed asset load and blocked request on
// <html data-js-errors="N" data-js-error-log="[...]"> and shows the last one on the page, so
// that an operator without devtools - and the headless browser test - sees it.
// A classic script loaded first: it also catches errors in the modules that follow.
(function () {
  "use strict";
  var root = document.documentElement;
  var log = [];
  root.setAttribute("data-js-errors", "0");

  function record(text) {
    log.push(String(text).slice(0, 400));
    root.setAttribute("data-js-errors", String(log.length));
    root.setAttribute("data-js-error-log", JSON.stringify(log.slice(-10)));
    var shown = document.getElementById("page-error");
    if (shown) {
      shown.hidden = false;
      shown.textContent = "This page hit an error (" + log.length + "): " + log[log.length - 1];
    }
  }

  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window && target.tagName) {
      record("failed to load " + (target.src || target.href || target.tagName));
    } else {
      record((event.message || "error") + " at " + event.filename + ":" + event.lineno);
    }
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    var reason = event.reason;
    record("unhandled rejection: " + (reason && reason.stack ? reason.stack : reason));
  });
  document.addEventListener("securitypolicyviolation", function (event) {
    record("blocked by the content security policy: " + event.blockedURI +
           " (" + event.violatedDirective + ")");
  });
})();
