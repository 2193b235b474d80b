/* layerwatch view: one step slider over every panel of a recording.
 *
 * Data arrive as scripts calling LW.manifest(...) and LW.add(kind, panel, chunk, base64):
 * a page opened from file:// may load scripts beside it but not fetch files. "img" chunks
 * are PNG sprite sheets (one frame per snapshot, stacked, the GIFs' palette); "val" chunks
 * are the values the cells show, byte-shuffled and deflated, float16 or float32.
 * Text from the recording is only ever set as textContent.
 */
"use strict";
var LW = (function () {
  var m = null, at = 0, playing = null, speed = 10;
  var imgs = {}, vals = {}, pending = {}, queue = [], active = 0, MAX_ACTIVE = 4;
  var ui = {}, panels = [], curves = [], focus = null, hover = null, drawn = [];
  var HALF = null;

  function el(tag, attrs, parent) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]);
    }
    if (parent) parent.appendChild(e);
    return e;
  }
  function svg(tag, attrs, parent) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function key(kind, p, c) { return kind + "/" + p + "/" + c; }
  function chunkOf(p, i) { return Math.floor(i / m.panels[p].chunk); }
  function lastAtMost(sorted, x) {  // index of the last element <= x, or -1
    var lo = 0, hi = sorted.length - 1, best = -1;
    while (lo <= hi) {
      var mid = (lo + hi) >> 1;
      if (sorted[mid] <= x) { best = mid; lo = mid + 1; } else hi = mid - 1;
    }
    return best;
  }
  function fmt(v) {
    if (!isFinite(v)) return String(v);
    return Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-4) ? v.toExponential(4)
      : String(Number(v.toPrecision(5)));
  }

  // ---- loading ------------------------------------------------------------------------
  function need(kind, p, c, urgent) {
    var k = key(kind, p, c);
    if (c < 0 || c * m.panels[p].chunk >= m.steps.length) return;
    if (imgs[k] || vals[k] || pending[k] || m.inline) return;
    pending[k] = true;
    var item = { kind: kind, p: p, c: c };
    if (urgent) queue.unshift(item); else queue.push(item);
    pump();
  }
  function pump() {
    while (active < MAX_ACTIVE && queue.length) {
      var item = queue.shift();
      active++;
      var s = document.createElement("script");
      s.src = "data/" + item.kind + "_" + item.p + "_" + item.c + ".js?v=" + m.rev;
      s.onload = s.onerror = (function (s, item) {
        return function (event) {
          active--;
          s.remove();
          if (event.type === "error") {
            delete pending[key(item.kind, item.p, item.c)];
            status("could not load " + s.src.split("/").pop().split("?")[0] +
                   ": rebuild the page (layerwatch view)");
          }
          pump();
        };
      })(s, item);
      document.body.appendChild(s);
    }
  }
  function add(kind, p, c, b64) {
    var k = key(kind, p, c), bytes = atob(b64), raw = new Uint8Array(bytes.length);
    for (var i = 0; i < bytes.length; i++) raw[i] = bytes.charCodeAt(i);
    pending[k] = true;
    if (kind === "img") {
      var im = new Image();
      im.onload = function () { imgs[k] = im; delete pending[k]; arrived(p, c); };
      im.src = "data:image/png;base64," + b64;
      return;
    }
    var stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate"));
    new Response(stream).arrayBuffer().then(function (buffer) {
      vals[k] = decode(new Uint8Array(buffer), m.panels[p].dtype);
      delete pending[k];
      arrived(p, c);
    });
  }
  function decode(shuffled, dtype) {
    var size = dtype === "f2" ? 2 : 4, n = shuffled.length / size;
    var bytes = new Uint8Array(shuffled.length);
    for (var b = 0; b < size; b++) {
      var off = b * n;
      for (var i = 0; i < n; i++) bytes[i * size + b] = shuffled[off + i];
    }
    if (size === 4) return new Float32Array(bytes.buffer);
    if (!HALF) {
      HALF = new Float32Array(65536);
      for (var h = 0; h < 65536; h++) {
        var sign = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, f = h & 1023;
        HALF[h] = e === 0 ? sign * f * Math.pow(2, -24)
          : e === 31 ? (f ? NaN : sign * Infinity) : sign * (1 + f / 1024) * Math.pow(2, e - 15);
      }
    }
    var half = new Uint16Array(bytes.buffer), out = new Float32Array(n);
    for (var j = 0; j < n; j++) out[j] = HALF[half[j]];
    return out;
  }
  function arrived(p, c) {
    if (chunkOf(p, at) === c) { draw(p); if (hover && hover.p === p) showTip(); }
    if (focus && focus.p === p) drawFocus();
  }

  // ---- page ---------------------------------------------------------------------------
  function manifest(next) {
    if (m === null) { m = next; build(); return; }
    if (next.rev === m.rev) return;
    var same = next.panels.length === m.panels.length && next.panels.every(function (p, i) {
      return p.sig === m.panels[i].sig;
    });
    if (!same) { location.reload(); return; }
    next.panels.forEach(function (p, i) {  // drop chunks whose snapshots changed
      var old = m.chunk_steps[i] || [];
      next.chunk_steps[i].forEach(function (steps, c) {
        if (JSON.stringify(old[c]) !== JSON.stringify(steps)) {
          delete imgs[key("img", i, c)]; delete vals[key("val", i, c)];
        }
      });
    });
    var step = m.steps[at];
    m = next;
    ui.slider.max = m.steps.length - 1;
    buildCurves();
    status("");
    go(Math.max(0, lastAtMost(m.steps, step)), true);
    if (!m.live) clearInterval(ui.poll);
  }
  function build() {
    document.title = m.title + " — layerwatch view";
    var header = el("header", {}, document.body);
    el("h1", { text: m.title + " — " + m.source }, header);
    var bar = el("div", { "class": "controls" }, header);
    ui.play = el("button", { type: "button", title: "play / pause (space)", text: "▶" }, bar);
    ui.prev = el("button", { type: "button", title: "one snapshot back (←)", text: "◀︎" }, bar);
    ui.slider = el("input", { type: "range", min: 0, max: m.steps.length - 1, value: 0,
                               "aria-label": "snapshot" }, bar);
    ui.next = el("button", { type: "button", title: "one snapshot on (→)", text: "▶︎" }, bar);
    ui.speed = el("select", { title: "snapshots per second" }, bar);
    [1, 2, 5, 10, 25, 50].forEach(function (s) {
      var o = el("option", { value: s, text: s + "/s" }, ui.speed);
      if (s === speed) o.selected = true;
    });
    ui.info = el("span", { "class": "stepinfo" }, bar);
    ui.status = el("div", { "class": "status" }, header);
    var main = el("main", {}, document.body);
    ui.curves = el("div", { "class": "curves" }, main);
    ui.panels = el("div", { "class": "panels" }, main);
    m.panels.forEach(function (p, i) {
      var fig = el("figure", { "data-panel": p.key }, ui.panels);
      var canvas = el("canvas", { "class": "px loading", width: p.width, height: p.height,
                                  "data-panel": i }, fig);
      var zoom = Math.max(1, Math.min(4, Math.floor(360 / p.width)));
      canvas.style.width = p.width * zoom + "px";
      el("figcaption", { text: p.title + " · " + p.info }, fig);
      canvas.addEventListener("mousemove", function (e) { hover = { p: i, e: e }; showTip(); });
      canvas.addEventListener("mouseleave", function () { hover = null; ui.tip.style.display = "none"; });
      canvas.addEventListener("click", function (e) {
        var cell = cellAt(i, e);
        if (cell && cell.row > 0) { focus = { p: i, channel: cell.row - 1 }; drawFocus(); }
      });
      panels.push({ canvas: canvas, ctx: canvas.getContext("2d") });
    });
    ui.focus = el("section", { id: "focus" }, main);
    ui.focusTitle = el("h2", {}, ui.focus);
    ui.focusNow = el("canvas", { "class": "px" }, ui.focus);
    ui.focusStrip = el("canvas", { "class": "px" }, ui.focus);
    el("p", { "class": "status", text: "Over training: the channel at evenly spaced steps; " +
              "click one to go there." }, ui.focus);
    ui.focusStrip.addEventListener("click", function (e) {
      var r = ui.focusStrip.getBoundingClientRect(), rows = ui.focusStrip.rows || [];
      var row = Math.floor((e.clientY - r.top) / r.height * rows.length);
      if (rows[row] !== undefined) go(rows[row]);
    });
    ui.tip = el("div", { id: "tip", role: "status" }, document.body);
    buildCurves();
    ui.slider.addEventListener("input", function () { go(+ui.slider.value); });
    ui.prev.addEventListener("click", function () { go(at - 1); });
    ui.next.addEventListener("click", function () { go(at + 1); });
    ui.play.addEventListener("click", toggle);
    ui.speed.addEventListener("change", function () { speed = +ui.speed.value; if (playing) { toggle(); toggle(); } });
    document.addEventListener("keydown", keys);
    window.addEventListener("hashchange", function () { go(fromHash(), true); });
    if (m.live && !m.inline) {
      status("recording: the page follows new snapshots");
      ui.poll = setInterval(function () {
        var s = document.createElement("script");
        s.src = "data/manifest.js?t=" + Date.now();
        s.onload = s.onerror = function () { s.remove(); };
        document.body.appendChild(s);
      }, m.poll_ms);
    }
    go(fromHash(), true);
  }
  function status(text) { ui.status.textContent = text; }
  function fromHash() {
    var match = /step=(-?\d+)/.exec(location.hash);
    return match ? Math.max(0, lastAtMost(m.steps, +match[1])) : 0;
  }
  function keys(e) {
    if (e.target === ui.slider && /Arrow|Home|End|Page/.test(e.key)) return;  // the slider's own
    if (e.target.tagName === "SELECT") return;
    var to = { ArrowLeft: at - 1, ArrowRight: at + 1, Home: 0, End: m.steps.length - 1 }[e.key];
    if (e.key === " ") { toggle(); e.preventDefault(); }
    else if (to !== undefined) { go(to); e.preventDefault(); }
  }
  function toggle() {
    if (playing) { clearInterval(playing); playing = null; ui.play.textContent = "▶"; return; }
    if (at >= m.steps.length - 1) go(0);
    ui.play.textContent = "❚❚";
    playing = setInterval(function () {
      if (at >= m.steps.length - 1) { toggle(); return; }
      var ready = m.panels.every(function (p, i) { return imgs[key("img", i, chunkOf(i, at + 1))]; });
      if (ready) go(at + 1);  // wait for a chunk rather than show a stale frame
    }, 1000 / speed);
  }
  function go(i, keepHash) {
    at = Math.max(0, Math.min(m.steps.length - 1, i | 0));
    ui.slider.value = at;
    var step = m.steps[at];
    ui.info.textContent = "step " + step + " · epoch " + (m.epochs[at] + 1) + " · snapshot " +
      (at + 1) + "/" + m.steps.length;
    if (!keepHash || location.hash) {  // not on every slider event: browsers throttle that
      clearTimeout(ui.hashTimer);
      ui.hashTimer = setTimeout(function () {
        try { history.replaceState(null, "", "#step=" + step); } catch (err) { /* about:srcdoc */ }
      }, 150);
    }
    m.panels.forEach(function (p, i) { draw(i); });
    m.panels.forEach(function (p, i) {  // the visible step first, then around it
      var c = chunkOf(i, at);
      need("val", i, c, false); need("img", i, c + 1, false); need("img", i, c - 1, false);
    });
    curves.forEach(moveCursor);
    if (hover) showTip();
    if (focus) drawFocus();
  }
  function draw(i) {
    var p = m.panels[i], c = chunkOf(i, at), im = imgs[key("img", i, c)], v = panels[i];
    if (!im) { v.canvas.classList.add("loading"); need("img", i, c, true); return; }
    v.ctx.drawImage(im, 0, (at % p.chunk) * p.height, p.width, p.height, 0, 0, p.width, p.height);
    v.canvas.classList.remove("loading");
    drawn[i] = at;
  }

  // ---- hover and focus ----------------------------------------------------------------
  function cellAt(i, e) {
    var p = m.panels[i], r = panels[i].canvas.getBoundingClientRect();
    var x = Math.floor((e.clientX - r.left) * p.width / r.width);
    var y = Math.floor((e.clientY - r.top) * p.height / r.height);
    var px = p.cell_w + p.gap, py = p.cell_h + p.gap;
    var col = Math.floor((x - p.grid_left) / px), row = Math.floor((y - p.grid_top) / py);
    var dx = x - p.grid_left - col * px, dy = y - p.grid_top - row * py;
    if (col < 0 || row < 0 || col >= p.probes || row > p.channels_shown ||
        dx >= p.cell_w || dy >= p.cell_h) return null;
    return { row: row, probe: col, vy: Math.floor(dy * p.vh / p.cell_h),
             vx: Math.floor(dx * p.vw / p.cell_w) };
  }
  function showTip() {
    var i = hover.p, e = hover.e, p = m.panels[i], cell = cellAt(i, e), tip = ui.tip;
    if (!cell) { tip.style.display = "none"; return; }
    var label = m.labels ? " (label " + m.labels[cell.probe] + ")" : "";
    var lines = [p.title + (cell.row ? " · channel " + p.channel_ids[cell.row - 1] : " · input"),
                 "probe " + cell.probe + label,
                 "step " + m.steps[at] + " · epoch " + (m.epochs[at] + 1)];
    delete tip.dataset.value;
    if (cell.row) {
      var c = chunkOf(i, at), data = vals[key("val", i, c)];
      lines.push("at (" + cell.vy + ", " + cell.vx + ")");
      if (data) {
        var index = ((((at % p.chunk) * p.probes + cell.probe) * p.channels_shown + cell.row - 1)
                     * p.vh + cell.vy) * p.vw + cell.vx;
        tip.dataset.value = String(data[index]);
        lines.push("value " + fmt(data[index]));
      } else { lines.push("value loading…"); need("val", i, c, true); }
    }
    tip.textContent = lines.join("\n");
    tip.style.display = "block";
    tip.style.left = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.min(e.clientY + 14, window.innerHeight - tip.offsetHeight - 4) + "px";
  }
  function drawFocus() {
    var p = m.panels[focus.p], ch = focus.channel, n = m.steps.length;
    var sy = p.grid_top + (1 + ch) * (p.cell_h + p.gap), sx = p.grid_left - p.gap;
    var w = p.probes * (p.cell_w + p.gap) + p.gap, h = p.cell_h;
    ui.focus.style.display = "block";
    ui.focusTitle.textContent = p.title + " · channel " + p.channel_ids[ch] +
      " · every probe, step " + m.steps[at];
    var zoom = Math.max(1, Math.floor(900 / w));
    var now = ui.focusNow, im = imgs[key("img", focus.p, chunkOf(focus.p, at))];
    now.width = w; now.height = h; now.style.width = w * zoom + "px";
    if (im) now.getContext("2d").drawImage(im, sx, (at % p.chunk) * p.height + sy, w, h, 0, 0, w, h);
    var rows = [], k = Math.min(8, n);
    for (var r = 0; r < k; r++) rows.push(k === 1 ? 0 : Math.round(r * (n - 1) / (k - 1)));
    var strip = ui.focusStrip, lab = 60;
    strip.rows = rows; strip.width = lab + w; strip.height = rows.length * (h + 2);
    strip.style.width = Math.min(900, (lab + w) * Math.max(1, Math.floor(zoom / 2))) + "px";
    var ctx = strip.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, strip.width, strip.height);
    ctx.fillStyle = "#000"; ctx.font = Math.min(12, h) + "px sans-serif"; ctx.textBaseline = "middle";
    rows.forEach(function (t, r) {
      var c = chunkOf(focus.p, t), sheet = imgs[key("img", focus.p, c)];
      ctx.fillText("step " + m.steps[t], 2, r * (h + 2) + h / 2);
      if (sheet) ctx.drawImage(sheet, sx, (t % p.chunk) * p.height + sy, w, h, lab, r * (h + 2), w, h);
      else need("img", focus.p, c, false);
    });
  }

  // ---- curves -------------------------------------------------------------------------
  function buildCurves() {
    ui.curves.textContent = "";
    curves = [];
    var W = 600, H = 150, s0 = m.steps[0], s1 = Math.max(m.steps[m.steps.length - 1], s0 + 1);
    (m.curves || []).forEach(function (cv) {
      var box = el("div", { "class": "curve", "data-metric": cv.name }, ui.curves);
      var label = el("div", { "class": "label" }, box);
      var root = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none" }, box);
      var all = [].concat(cv.train ? cv.train[1] : [], cv.val ? cv.val[1] : []);
      var lo = Math.min.apply(null, all.length ? all : [0]), hi = Math.max.apply(null, all.length ? all : [1]);
      if (hi <= lo) { hi = lo + 1; }
      var X = function (s) { return (s - s0) / (s1 - s0) * (W - 8) + 4; };
      var Y = function (v) { return H - 4 - (v - lo) / (hi - lo) * (H - 8); };
      if (cv.train) {
        var d = cv.train[0].map(function (s, j) {
          return (j ? "L" : "M") + X(s).toFixed(1) + " " + Y(cv.train[1][j]).toFixed(1);
        }).join("");
        svg("path", { d: d, "class": "train" }, root);
      }
      if (cv.val) cv.val[0].forEach(function (s, j) {
        svg("circle", { cx: X(s), cy: Y(cv.val[1][j]), r: 3, "class": "val" }, root);
      });
      var cursor = svg("line", { y1: 0, y2: H, "class": "cursor" }, root);
      root.addEventListener("click", function (e) {
        var r = root.getBoundingClientRect();
        var s = s0 + ((e.clientX - r.left) / r.width * W - 4) / (W - 8) * (s1 - s0);
        go(Math.max(0, lastAtMost(m.steps, s)));
      });
      curves.push({ cv: cv, label: label, cursor: cursor, X: X });
    });
  }
  function moveCursor(c) {
    var step = m.steps[at], x = c.X(step).toFixed(1);
    c.cursor.setAttribute("x1", x); c.cursor.setAttribute("x2", x);
    var text = c.cv.name;
    if (c.cv.train) {
      var j = lastAtMost(c.cv.train[0], step);
      if (j >= 0) text += " " + fmt(c.cv.train[1][j]) + " (step " + c.cv.train[0][j] + ")";
    }
    if (c.cv.val) {
      var k = lastAtMost(c.cv.val[0], step);
      if (k >= 0) text += " · val " + fmt(c.cv.val[1][k]);
    }
    c.label.textContent = text;
  }

  return {
    manifest: manifest, add: add, go: go,
    state: function () {
      return { index: at, step: m && m.steps[at], drawn: drawn.slice(), playing: !!playing,
               manifest: m };
    }
  };
})();
