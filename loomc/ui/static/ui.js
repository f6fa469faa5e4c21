// loomc ui: keeps a run page current. Polls the page's own /live address and swaps in
// the part that changed; the server renders (and escapes) every byte of it.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  const src = live.dataset.src;
  let version = live.dataset.version || "";
  let interval = Number(live.dataset.interval) || 1;

  function busy() {
    // someone is typing a reply: do not replace the form under them
    const active = document.activeElement;
    return active !== null && live.contains(active) && active.closest("form") !== null;
  }

  async function poll() {
    try {
      const url = src + (src.includes("?") ? "&" : "?") + "since=" + encodeURIComponent(version);
      const answer = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      const poll = Number(answer.headers.get("x-loomc-poll"));
      if (poll > 0) interval = poll;
      if (answer.status === 200 && !busy()) {
        const html = await answer.text();
        const fresh = document.createElement("template");
        fresh.innerHTML = html;
        live.replaceChildren(fresh.content);
        version = answer.headers.get("x-loomc-version") || "";
        live.dataset.version = version;
      }
    } catch (err) {
      // the server stopped or the network dropped: try again later
      interval = Math.min(interval * 2, 30);
    }
    setTimeout(poll, interval * 1000);
  }
  setTimeout(poll, interval * 1000);
})();
