/* The result viewer (GET /jobs/{id}/view): the slide's Deep Zoom pyramid with one layer per class
 * over it, the QC layers (confidence, artefacts) over those, a toggle per layer, an opacity slider
 * and the GeoJSON polygons as an SVG overlay.
 * Configuration comes from the page's JSON block; every request carries the page's signed token.
 * window.fprotosegViewer.ready() tells a test (or a person in the console) when every layer is drawn. */
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("fprotoseg-config").textContent);
  var q = "?token=" + encodeURIComponent(cfg.token);
  var maxLevel = cfg.levels - 1;

  function source(layer, ext) {
    return {
      width: cfg.width_px, height: cfg.height_px, tileSize: cfg.tile_px, tileOverlap: 0,
      minLevel: 0, maxLevel: maxLevel,
      getTileUrl: function (level, x, y) {
        return "view/" + layer + "_files/" + level + "/" + x + "_" + y + "." + ext + q;
      }
    };
  }

  var viewer = OpenSeadragon({
    id: "viewer", drawer: "canvas", showNavigationControl: false, showNavigator: true,
    maxZoomPixelRatio: 4, visibilityRatio: 0.5, crossOriginPolicy: false,
    tileSources: [{ tileSource: source(cfg.slide_layer, "jpeg"), x: 0, y: 0, width: 1 }]
  });
  var layers = {};          // layer name -> TiledImage
  var overlays = cfg.class_layers.concat(cfg.qc_layers || []);  // bottom to top
  var expected = 1 + overlays.length;
  var opacity = document.getElementById("opacity");

  function alphaFor(name) {
    var box = document.querySelector('input[data-layer="' + name + '"]');
    return box && box.checked ? Number(opacity.value) / 100 : 0;
  }
  function restyle() {
    Object.keys(layers).forEach(function (name) { layers[name].setOpacity(alphaFor(name)); });
  }

  viewer.addHandler("open", function () {
    overlays.forEach(function (layer) {  // OpenSeadragon adds them in this order
      viewer.addTiledImage({
        tileSource: source(layer.layer, "png"), x: 0, y: 0, width: 1, opacity: alphaFor(layer.layer),
        preload: true,  // a hidden layer's tiles load too: toggling it on shows it at once
        success: function (event) { layers[layer.layer] = event.item; restyle(); }
      });
    });
    placePolygons();
  });
  document.querySelectorAll("input[data-layer]").forEach(function (box) {
    box.addEventListener("change", restyle);
  });
  opacity.addEventListener("input", restyle);

  /* Polygons: level-0 pixel coordinates (as in the GeoJSON) drawn in an SVG group whose
   * transform follows the viewport; the stroke keeps its screen width at every zoom. */
  var svgNS = "http://www.w3.org/2000/svg";
  var svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "polygons");
  svg.style.position = "absolute"; svg.style.left = "0"; svg.style.top = "0";
  svg.style.width = "100%"; svg.style.height = "100%"; svg.style.pointerEvents = "none";
  var group = document.createElementNS(svgNS, "g");
  svg.appendChild(group);
  viewer.canvas.appendChild(svg);
  var polygonsBox = document.getElementById("polygons");
  var polygonsLoaded = null;
  var polygonsDrawn = false;

  function placePolygons() {
    var p0 = viewer.viewport.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    var p1 = viewer.viewport.pixelFromPoint(new OpenSeadragon.Point(1, 0), true);
    var scale = (p1.x - p0.x) / (cfg.width_px * cfg.level0_px_per_viewer_px);
    group.setAttribute("transform", "translate(" + p0.x + "," + p0.y + ") scale(" + scale + ")");
  }
  ["animation", "update-viewport", "resize"].forEach(function (e) { viewer.addHandler(e, placePolygons); });

  function ringPath(ring) {
    return "M" + ring.map(function (pt) { return pt[0] + " " + pt[1]; }).join("L") + "Z";
  }
  function drawPolygons(collection) {
    var colours = {};
    cfg.class_layers.forEach(function (l) { colours[l.name] = l.color; });
    collection.features.forEach(function (feature) {
      var g = feature.geometry, polys = g.type === "Polygon" ? [g.coordinates] : g.coordinates;
      var c = (feature.properties.classification || {}).color || [0, 0, 0];
      var path = document.createElementNS(svgNS, "path");
      path.setAttribute("d", polys.map(function (poly) { return poly.map(ringPath).join(""); }).join(""));
      path.setAttribute("fill", "none");
      path.setAttribute("stroke", "rgb(" + Math.round(c[0] * 0.6) + "," + Math.round(c[1] * 0.6) + "," +
                        Math.round(c[2] * 0.6) + ")");
      path.setAttribute("stroke-width", "1.5");
      path.setAttribute("vector-effect", "non-scaling-stroke");
      group.appendChild(path);
    });
  }
  function togglePolygons() {
    svg.style.display = polygonsBox.checked ? "" : "none";
    if (polygonsBox.checked && !polygonsLoaded) {
      polygonsLoaded = fetch("view/polygons" + q).then(function (r) {
        if (!r.ok) { throw new Error("polygons: HTTP " + r.status); }
        return r.json();
      }).then(function (collection) { drawPolygons(collection); polygonsDrawn = true; });
    }
  }
  polygonsBox.addEventListener("change", togglePolygons);
  togglePolygons();

  window.fprotosegViewer = {
    viewer: viewer,
    ready: function () {
      var items = [];
      for (var i = 0; i < viewer.world.getItemCount(); i++) { items.push(viewer.world.getItemAt(i)); }
      return items.length === expected && items.every(function (it) { return it.getFullyLoaded(); }) &&
        (!polygonsBox.checked || polygonsDrawn);
    }
  };
})();
