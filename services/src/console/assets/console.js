// Dropline console: the one-time sign-in link, and live figures over server-sent events.
// Hand-written, no dependencies: the pages work without it (they are server-rendered),
// it only keeps them current.
(function () {
  "use strict";

  // A one-time sign-in link carries its token in the fragment, which browsers never send
  // to a server: post it from here, and take it out of the address bar and history.
  var once = /^#once=([0-9a-f]{64})$/.exec(window.location.hash);
  var onceForm = document.getElementById("once-form");
  if (once && onceForm) {
    window.history.replaceState(null, "", window.location.pathname);
    document.getElementById("once").value = once[1];
    document.getElementById("once-status").textContent = "Signing in…";
    onceForm.submit();
    return;
  }

  var live = document.querySelector("[data-live]");
  if (!live || !window.EventSource) {
    return;
  }
  // Every element with data-k shows the value of that key in each update.
  var cells = new Map();
  document.querySelectorAll("[data-k]").forEach(function (el) {
    cells.set(el.getAttribute("data-k"), el);
  });
  var state = document.getElementById("live-state");
  var say = function (text) {
    if (state) {
      state.textContent = text;
    }
  };
  var source = new EventSource(live.getAttribute("data-live"));
  source.onopen = function () {
    say("Live: figures update as they change.");
  };
  source.onerror = function () {
    say("Connection lost: reconnecting…");
  };
  source.addEventListener("figures", function (event) {
    var data = JSON.parse(event.data);
    var unknown = 0;
    Object.keys(data).forEach(function (key) {
      var el = cells.get(key);
      if (!el) {
        unknown += 1;
        return;
      }
      if (el.textContent !== data[key]) {
        el.textContent = data[key];
        el.classList.add("changed");
        window.setTimeout(function () {
          el.classList.remove("changed");
        }, 800);
      }
    });
    if (unknown > 0) {
      say("New rows (a new pool or hub): reload the page to see them.");
    }
  });
  // New statement lines go on top of the live table.
  source.addEventListener("line", function (event) {
    var line = JSON.parse(event.data);
    var body = document.getElementById("live-lines");
    if (!body || document.getElementById("line-" + line.seq)) {
      return;
    }
    var row = document.createElement("tr");
    row.id = "line-" + line.seq;
    row.className = "changed";
    line.cells.forEach(function (text) {
      var cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    });
    body.insertBefore(row, body.firstChild);
    var empty = document.getElementById("no-lines");
    if (empty) {
      empty.remove();
    }
    window.setTimeout(function () {
      row.classList.remove("changed");
    }, 800);
  });
  source.addEventListener("signed-out", function () {
    source.close();
    window.location.assign("/sign-in");
  });
})();
