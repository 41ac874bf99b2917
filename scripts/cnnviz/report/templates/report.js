/* cnnviz report: sortable tables and the image filters. Progressive enhancement only: without
   JavaScript every table is complete and unsorted, and the filter form stays hidden. */
(function () {
  "use strict";
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  function cellKey(cell, numeric) {
    var raw = cell ? cell.getAttribute("data-v") : null;
    if (raw === null) raw = cell ? cell.textContent.trim() : "";
    if (!numeric) return raw.toLowerCase();
    var value = parseFloat(raw);
    return isNaN(value) ? -Infinity : value;
  }

  function makeSortable(table) {
    if (!table.tHead || !table.tBodies.length) return;
    var heads = table.tHead.rows[0].cells;
    each(heads, function (th, column) {
      var kind = th.getAttribute("data-sort");
      if (!kind) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      button.title = "Sort by this column";
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      th.setAttribute("aria-sort", "none");
      button.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        each(heads, function (h) { if (h.hasAttribute("aria-sort")) h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var keyed = Array.prototype.map.call(body.rows, function (row, i) {
          return [cellKey(row.cells[column], kind === "num"), i, row];
        });
        keyed.sort(function (a, b) {
          var order = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
          return (ascending ? order : -order) || a[1] - b[1];
        });
        var fragment = document.createDocumentFragment();
        keyed.forEach(function (k) { fragment.appendChild(k[2]); });
        body.appendChild(fragment);
      });
    });
  }

  function makeFilter(form) {
    var table = document.getElementById(form.getAttribute("data-table"));
    if (!table || !table.tBodies.length) return;
    var byClass = form.querySelector("[data-f=class]");
    var minConf = form.querySelector("[data-f=conf]");
    var correct = form.querySelector("[data-f=ok]");
    var shownConf = form.querySelector("output");
    var count = form.querySelector(".count");
    function apply() {
      var text = byClass ? byClass.value.trim().toLowerCase() : "";
      var least = minConf ? parseFloat(minConf.value) / 100 : 0;
      var want = correct ? correct.value : "";
      if (shownConf && minConf) shownConf.textContent = minConf.value + "%";
      var rows = table.tBodies[0].rows, shown = 0;
      for (var i = 0; i < rows.length; i++) {
        var row = rows[i];
        var visible = (!text || (row.getAttribute("data-class") || "").indexOf(text) >= 0) &&
          parseFloat(row.getAttribute("data-conf") || "0") + 1e-9 >= least &&
          (!want || row.getAttribute("data-ok") === want);
        row.hidden = !visible;
        if (visible) shown++;
      }
      if (count) count.textContent = shown + " of " + rows.length + " images shown";
    }
    form.addEventListener("input", apply);
    form.addEventListener("change", apply);
    form.addEventListener("submit", function (event) { event.preventDefault(); });
    form.hidden = false;
    apply();
  }

  each(document.querySelectorAll("table.sortable"), makeSortable);
  each(document.querySelectorAll("form.filters[data-table]"), makeFilter);
})();
