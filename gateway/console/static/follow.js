// The violations feed, live: each denial the gateway stores arrives as a table row (server-sent
// events from /violations/live). Without JavaScript the table above is the whole, static feed.
(function () {
  var table = document.getElementById("violations");
  if (!table || !window.EventSource) { return; }
  var rows = document.getElementById("violation-rows");
  var count = document.getElementById("count");
  var live = document.getElementById("live");
  var source = new EventSource(table.getAttribute("data-live"));
  source.onopen = function () { live.hidden = false; };
  source.onmessage = function (event) {
    var holder = document.createElement("tbody");
    holder.innerHTML = event.data; // rendered and escaped by the server's templates
    while (holder.firstChild) { rows.insertBefore(holder.lastChild, rows.firstChild); }
    count.textContent = String(rows.querySelectorAll("tr").length);
  };
})();
