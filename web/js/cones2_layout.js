// Cones2 layout editor: a canvas on "Cones2 Layout Guidance" for drawing one box per subject.
// This file is the pack's one frontend extension; the modules under layout/ only export:
//   model.js   the layout text read and written, box tracks (keyframes) interpolated, hit-testing (no DOM, no
//              ComfyUI: node can import it)
//   graph.js   questions to the workflow graph (widgets, latent size, prompt words, maps source)
//   render.js  drawing the frame, boxes, labels and attention maps on the canvas
//   panel.js   the editor's DOM and style sheet
//   events.js  mouse, keys, controls, text box and websocket events
//   editor.js  LayoutEditor, one node's state kept in step with its `layout` text
//   mount.js   keeping an editor on the page and in step under both node renderers (canvas and Vue nodes)
//   comfy.js   the frontend's app and api objects
//
// The node's `layout` STRING widget holds the layout JSON and stays the single source of truth. The editor
// itself is a DOM widget that is never serialised, so workflows, copies and API prompts carry only the JSON
// text. No network access, no images stored anywhere.
//
// Attention maps: when a "Cones2 Attention Maps" node whose `model` input comes straight from this node
// finishes, its ui entry `cones2_maps` (the largest grid's maps, one per subject, from the frontend's own
// websocket "executed" event) is kept in memory on this editor; the "maps" toggle draws them under the boxes
// and adds each subject's in-region share to its label. They are never written to the layout or the workflow.
import { comfyApp } from "./layout/comfy.js";
import { LayoutEditor } from "./layout/editor.js";
import { widgetByName } from "./layout/graph.js";
import { EDITOR_WIDGET, LAYOUT_WIDGET, NODE_TYPE } from "./layout/model.js";
import { MIN_HEIGHT } from "./layout/panel.js";

comfyApp().registerExtension({
  name: "cones2.layout",
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE && node.type !== NODE_TYPE) return;
    const layoutWidget = widgetByName(node, LAYOUT_WIDGET);
    if (!layoutWidget || widgetByName(node, EDITOR_WIDGET)) return;
    if (layoutWidget.dynamicPrompts) {
      // {a|b} expansion would eat the JSON's braces
      layoutWidget.dynamicPrompts = false;
      delete layoutWidget.serializeValue;
    }
    // the JSON box scrolls; the drawing gets the room
    if (layoutWidget.options && !layoutWidget.options.getMaxHeight) layoutWidget.options.getMaxHeight = () => 150;
    const editor = new LayoutEditor(node, layoutWidget);
    // Added last: a non-serialised widget before others would shift widgets_values.
    const widget = node.addDOMWidget(EDITOR_WIDGET, "cones2-layout", editor.root, {
      serialize: false,
      hideOnZoom: true,
      getMinHeight: () => MIN_HEIGHT,
      getValue: () => undefined,
      setValue: () => {},
      onDraw: () => editor.onDraw(),
    });
    widget.serialize = false;
    node.cones2Layout = editor;   // the one hook for tests: node.cones2Layout.state()

    const onRemoved = node.onRemoved;
    node.onRemoved = function (...args) {
      editor.destroy();
      if (node.cones2Layout === editor) delete node.cones2Layout;
      return onRemoved?.apply(this, args);
    };
    const size = node.computeSize();
    node.setSize([Math.max(size[0], 420), Math.max(size[1], 720)]);
  },
});
