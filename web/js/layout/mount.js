// Keeping an editor on the page and in step under both node renderers of the frontend. Only exports (see
// model.js).
//
// Classic (canvas) mode draws the node every frame and calls the DOM widget's onDraw; the Vue node renderer
// ("Nodes 2.0") never does, so each editor watches on animation frames: when the canvas has not drawn it lately,
// the watch keeps it in step with its text and the latent size itself.
//
// The frontend mounts a DOM widget's element when the node's view is created. Undo and loading a workflow
// replace every node with a new one of the same id; under Vue nodes the node's view stays (patched, not
// created again), so the new node's editor element would never be mounted: the old editor's place stays empty.
// An editor going away notes the place its element had (`vacate`); a new editor of the same node id whose
// element is still not on the page a few frames later takes that place, if it is still on the page and empty
// (`reclaim`). No element is kept beyond that: each frame asks the page afresh.
const vacated = new Map();   // "graph id:node id" -> {parent, until}
const VACATED_MS = 3000;     // how long an empty place waits for its node's next editor
const MISSING_FRAMES = 3;    // frames an editor's element must be off the page before it takes a place
const DRAWN_MS = 100;        // the canvas drew the node this recently: its onDraw keeps the editor in step
const WATCH_MS = 100;        // otherwise the watch does, this often

// node ids are unique within one graph (the root graph or a subgraph), and kept when a graph is loaded again
const slotKey = (node) => `${node.graph?.id ?? ""}:${node.id}`;

function sweep(now) {
  for (const [key, v] of vacated) if (v.until < now || !v.parent.isConnected) vacated.delete(key);
}

/** Removes the editor's element from the page, noting its place for the node's next editor. */
export function vacate(ed) {
  const parent = ed.root.parentElement;
  ed.root.remove();
  sweep(performance.now());
  if (parent?.isConnected && ed.node.id != null && ed.node.id !== -1) {
    vacated.set(slotKey(ed.node), { parent, until: performance.now() + VACATED_MS });
  }
}

function reclaim(ed, now) {
  sweep(now);
  const key = slotKey(ed.node);
  const place = vacated.get(key);
  if (!place || place.parent.childElementCount) return false;
  vacated.delete(key);
  place.parent.replaceChildren(ed.root);
  ed.remounts++;
  return true;
}

/** Starts the editor's frame watch; returns the function that stops it. */
export function watch(ed) {
  let frame = 0, missing = 0, watched = -Infinity;
  const tick = (now) => {
    frame = requestAnimationFrame(tick);
    if (!ed.root.isConnected) {
      // off the page: a collapsed node, a node of another graph, or a new node whose view was kept
      if (++missing >= MISSING_FRAMES) reclaim(ed, now);
      return;
    }
    missing = 0;
    if (now - ed.lastDrawn > DRAWN_MS && now - watched >= WATCH_MS) {
      watched = now;
      ed.onFrame();
    }
  };
  frame = requestAnimationFrame(tick);
  return () => cancelAnimationFrame(frame);
}
