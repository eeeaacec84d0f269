/* gigaseg view: the page's logic. OpenSeadragon and this file come from the gigaseg package;
   the page loads nothing from any other server. State is kept on window.gigaseg (for the
   browser console and the end-to-end tests). */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var state = {
    info: null,        // /api/info
    viewer: null,      // the OpenSeadragon viewer
    items: {},         // mask id -> its TiledImage
    boxItems: {},      // detection file id -> its TiledImage
    boxesShown: {},    // detection file id -> whether its boxes are drawn
    current: null,     // id of the mask shown, or null for the image alone
    opacity: 0.5,      // of the mask shown
    areas: {},         // /api/areas
    ready: false,      // the image and every mask are open
    error: null,
  };
  window.gigaseg = state;

  function fetchJSON(url) {
    return fetch(url, { cache: "no-store" }).then(function (response) {
      if (!response.ok) { throw new Error(url + ": HTTP " + response.status); }
      return response.json();
    });
  }

  function showError(error) {
    state.error = String(error && error.message || error);
    $("legend-state").textContent = "error: " + state.error;
    if (window.console) { console.error(error); }
  }

  /* A square of a class's colour, as the legends and the cursor show it. */
  function swatch(color) {
    var square = document.createElement("span");
    square.className = "swatch";
    square.style.background = color;
    return square;
  }

  function maskInfo(id) {
    return state.info.masks.filter(function (m) { return m.id === id; })[0] || null;
  }

  // -- masks: the choice, the opacity ------------------------------------------------------

  function buildMaskChoices(info) {
    var box = $("masks");
    var choices = [{ id: "", name: "image only" }].concat(info.masks);
    choices.forEach(function (mask) {
      var label = document.createElement("label");
      var input = document.createElement("input");
      input.type = "radio";
      input.name = "mask";
      input.value = mask.id;
      input.id = "mask-" + (mask.id || "none");
      input.addEventListener("change", function () { selectMask(mask.id || null); });
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + mask.name));
      box.appendChild(label);
    });
    $("opacity").addEventListener("input", function (event) {
      state.opacity = Number(event.target.value) / 100;
      $("opacity-value").textContent = event.target.value + "%";
      applyOpacity();
    });
  }

  function applyOpacity() {
    Object.keys(state.items).forEach(function (id) {
      state.items[id].setOpacity(id === state.current ? state.opacity : 0);
    });
  }

  function selectMask(id) {
    state.current = id && state.items[id] ? id : null;
    var radio = $("mask-" + (state.current || "none"));
    if (radio) { radio.checked = true; }
    applyOpacity();
    renderLegend();
    showCursorClass();
  }
  state.selectMask = selectMask;

  // -- boxes: one switch per detection file, its classes and counts ----------------------------

  function buildBoxChoices(info) {
    if (!info.detections.length) { return; }
    $("boxes-section").hidden = false;
    var box = $("boxes");
    info.detections.forEach(function (file) {
      state.boxesShown[file.id] = true;
      var label = document.createElement("label");
      var input = document.createElement("input");
      input.type = "checkbox";
      input.checked = true;
      input.id = "boxes-" + file.id;
      input.addEventListener("change", function () { showBoxes(file.id, input.checked); });
      label.appendChild(input);
      label.appendChild(document.createTextNode(" " + file.name + " (" + file.count.toLocaleString("en-US") + ")"));
      box.appendChild(label);
      var list = document.createElement("table");
      list.className = "box-classes";
      file.classes.forEach(function (cls) {
        var row = list.insertRow();
        row.dataset.classId = cls.id;
        row.insertCell().appendChild(swatch(cls.color));
        row.insertCell().textContent = cls.name;
        var count = row.insertCell();
        count.className = "num";
        count.textContent = cls.count.toLocaleString("en-US");
      });
      box.appendChild(list);
    });
  }

  function showBoxes(id, shown) {
    state.boxesShown[id] = shown;
    var checkbox = $("boxes-" + id);
    if (checkbox) { checkbox.checked = shown; }
    if (state.boxItems[id]) { state.boxItems[id].setOpacity(shown ? 1 : 0); }
    showCursorBoxes();
  }
  state.showBoxes = showBoxes;

  // -- the legend: colours, names and exact areas -----------------------------------------

  function renderLegend() {
    var body = $("legend").tBodies[0];
    body.textContent = "";
    var note = "";
    var mask = state.current && maskInfo(state.current);
    if (!mask) {
      $("legend-state").textContent = state.error ? "error: " + state.error : "(no mask shown)";
      return;
    }
    var status = state.areas[mask.id];
    var classes = mask.classes;
    if (status && status.done) {
      classes = status.classes;
    } else if (status && status.error) {
      note = "counting failed: " + status.error;
    } else {
      note = "counting " + Math.floor(100 * (status ? status.progress : 0)) + "%";
    }
    classes.forEach(function (cls) {
      var row = body.insertRow();
      row.dataset.classId = cls.id;
      row.insertCell().appendChild(swatch(cls.color));
      row.insertCell().textContent = cls.name;
      var pixels = row.insertCell();
      var share = row.insertCell();
      pixels.className = share.className = "num";
      pixels.textContent = cls.pixels === undefined ? "…" : cls.pixels.toLocaleString("en-US");
      share.textContent = cls.fraction === undefined ? "" : (100 * cls.fraction).toFixed(2) + "%";
    });
    $("legend-state").textContent = state.error ? "error: " + state.error : note;
  }

  function pollAreas() {
    fetchJSON("/api/areas").then(function (areas) {
      state.areas = areas;
      renderLegend();
      var waiting = Object.keys(areas).some(function (id) { return !areas[id].done && !areas[id].error; });
      if (waiting) { setTimeout(pollAreas, 400); }
    }).catch(showError);
  }

  // -- the cursor: pixel coordinates and the class under it ------------------------------

  var cursor = { x: null, y: null, labels: null, boxes: null, asked: null, busy: false };

  function onPointerMove(event) {
    var image = state.viewer && state.viewer.world.getItemAt(0);
    if (!image) { return; }
    var rect = state.viewer.element.getBoundingClientRect();
    var point = new OpenSeadragon.Point(event.clientX - rect.left, event.clientY - rect.top);
    var p = image.viewerElementToImageCoordinates(point);
    var x = Math.floor(p.x), y = Math.floor(p.y);
    if (x < 0 || y < 0 || x >= state.info.image.width || y >= state.info.image.height) {
      onPointerLeave();
      return;
    }
    if (x === cursor.x && y === cursor.y) { return; }
    cursor.x = x;
    cursor.y = y;
    cursor.labels = null;
    cursor.boxes = null;
    $("cursor-xy").textContent = "x " + x + ", y " + y;
    showCursorClass();
    showCursorBoxes();
    askPixel();
  }

  function onPointerLeave() {
    cursor.x = cursor.y = cursor.labels = cursor.boxes = null;
    $("cursor-xy").textContent = "—";
    $("cursor-class").textContent = "";
    $("cursor-boxes").textContent = "";
  }

  function askPixel() {
    // one request at a time, always for the latest position
    if (cursor.busy || cursor.x === null || !(state.info.masks.length || state.info.detections.length)) { return; }
    var x = cursor.x, y = cursor.y;
    cursor.busy = true;
    fetchJSON("/api/pixel?x=" + x + "&y=" + y).then(function (answer) {
      cursor.busy = false;
      if (answer.x === cursor.x && answer.y === cursor.y) {
        cursor.labels = answer.labels;
        cursor.boxes = answer.boxes;
        showCursorClass();
        showCursorBoxes();
      } else {
        askPixel();
      }
    }).catch(function (error) { cursor.busy = false; showError(error); });
  }

  function showCursorClass() {
    var out = $("cursor-class");
    out.textContent = "";
    delete out.dataset.classId;
    if (cursor.x === null || !state.current) { return; }
    var label = cursor.labels && cursor.labels[state.current];
    if (!label) { out.textContent = "…"; return; }
    var name = document.createElement("span");
    name.className = "name";
    name.textContent = label.name;
    out.appendChild(swatch(label.color));
    out.appendChild(name);
    out.dataset.classId = label.id;
  }

  /* The boxes under the cursor, of the detection files shown: class, score. */
  function showCursorBoxes() {
    var out = $("cursor-boxes");
    out.textContent = "";
    if (cursor.x === null || !cursor.boxes) { return; }
    Object.keys(cursor.boxes).forEach(function (id) {
      if (!state.boxesShown[id]) { return; }
      cursor.boxes[id].forEach(function (found) {
        var item = document.createElement("li");
        item.dataset.classId = found["class"];
        item.appendChild(swatch(found.color));
        item.appendChild(document.createTextNode(" " + found.name + " " + found.score.toFixed(2)));
        out.appendChild(item);
      });
    });
  }

  // -- start ------------------------------------------------------------------------------

  /* True when every shown layer has the tiles of the current view and is drawn (for tests). */
  state.isIdle = function () {
    var viewer = state.viewer;
    if (!state.ready || !viewer) { return false; }
    var shown = [viewer.world.getItemAt(0)];
    if (state.current) { shown.push(state.items[state.current]); }
    Object.keys(state.boxItems).forEach(function (id) {
      if (state.boxesShown[id]) { shown.push(state.boxItems[id]); }
    });
    var loaded = shown.every(function (item) { return item.getFullyLoaded() && !item.needsDraw(); });
    var vp = viewer.viewport;
    var still = vp.getZoom(true) === vp.getZoom(false) && vp.getCenter(true).equals(vp.getCenter(false));
    return loaded && still;
  };

  function start(info) {
    state.info = info;
    document.title = info.image.name + " · gigaseg view";
    $("title").textContent = info.image.name;
    $("size").textContent = info.image.width + " × " + info.image.height + " px, " +
      info.image.channels + " × " + info.image.dtype;
    buildMaskChoices(info);
    buildBoxChoices(info);
    var viewer = OpenSeadragon({
      id: "osd",
      prefixUrl: "/static/images/",
      tileSources: info.image.dzi,
      drawer: "canvas",
      imageSmoothingEnabled: false,
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      showRotationControl: false,
      maxZoomPixelRatio: 8,
      visibilityRatio: 0.5,
      timeout: 120000,
      gestureSettingsMouse: { clickToZoom: false },
    });
    state.viewer = viewer;
    viewer.addOnceHandler("open-failed", function (event) { showError(new Error(event.message)); });
    viewer.addOnceHandler("open", function () {
      var pending = info.masks.length + info.detections.length;
      var done = function () {
        state.ready = true;
        selectMask(info.masks.length ? info.masks[0].id : null);
      };
      if (!pending) { done(); }
      var finished = function () {
        pending -= 1;
        if (pending === 0) { done(); }
      };
      info.masks.forEach(function (mask, i) {
        viewer.addTiledImage({
          tileSource: mask.dzi,
          index: i + 1,
          opacity: 0,
          preload: false,
          success: function (event) {
            state.items[mask.id] = event.item;
            finished();
          },
          error: function (event) { showError(new Error(mask.name + ": " + event.message)); },
        });
      });
      info.detections.forEach(function (file, i) {
        viewer.addTiledImage({  // above every mask
          tileSource: file.dzi,
          index: info.masks.length + i + 1,
          opacity: 1,
          preload: false,
          success: function (event) {
            state.boxItems[file.id] = event.item;
            event.item.setOpacity(state.boxesShown[file.id] ? 1 : 0);
            finished();
          },
          error: function (event) { showError(new Error(file.name + ": " + event.message)); },
        });
      });
    });
    viewer.element.addEventListener("pointermove", onPointerMove);
    viewer.element.addEventListener("pointerleave", onPointerLeave);
    renderLegend();
    if (info.masks.length) { pollAreas(); }
  }

  fetchJSON("/api/info").then(start).catch(showError);
})();
