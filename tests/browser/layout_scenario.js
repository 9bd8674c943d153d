// One browser session against the real ComfyUI + frontend, driving the Cones2 layout widget like a user.
//   node tests/browser/layout_scenario.js [--vue-nodes on|off] <server url> <workflow.json> <screenshot.png>
//     [<maps screenshot.png> [<flux workflow.json>]]
// --vue-nodes sets the frontend's "Modern Node Design (Nodes 2.0)" (Comfy.VueNodes.Enabled) before the page
// loads; without it the user's settings stay as they are (frontends before Nodes 2.0 have no such setting).
// Prints "RESULT {json}" with one entry per step: {ok, ...details}; a failing step stops the run
// (later steps depend on it) and is reported with its error.
'use strict';
const fs = require('fs');
const { openComfy, gotoComfy, settle, run } = require('./browser_common');

const argv = process.argv.slice(2);
const settings = {};
if (argv[0] === '--vue-nodes') {
  settings['Comfy.VueNodes.Enabled'] = argv[1] === 'on';
  argv.splice(0, 2);
}
const [url, workflowPath, shotPath, mapsArg, fluxWorkflowPath] = argv;
const mapsShotPath = mapsArg || shotPath.replace(/\.png$/, '') + '_maps.png';
const NODE = 'Cones2LayoutGuidance';
const ROOMY = [460, 1000];   // the layout node's size for the mouse steps

run(async () => {
  const out = { steps: {}, order: [] };
  const { browser, page, errors } = await openComfy(url, { viewport: { width: 1400, height: 1200 }, settings });
  try {
    await scenario(out, page, errors);
  } catch (e) {
    out.failed = String(e && e.stack || e);
  }
  out.errors = errors.filter((e) => /cones2/i.test(e));
  await browser.close();
  return out;
});

async function scenario(out, page, errors) {
  const step = async (name, fn) => {
    const t0 = Date.now();
    try {
      const r = (await fn()) || {};
      out.steps[name] = { ok: true, ms: Date.now() - t0, ...r };
    } catch (e) {
      out.steps[name] = { ok: false, ms: Date.now() - t0, error: String(e && e.stack || e) };
      throw e;
    }
    out.order.push(name);
  };

  // ---- helpers run in the page ------------------------------------------------------------------
  const layoutNode = () => page.evaluate((type) => {
    const n = window.app.graph.nodes.find((x) => x.type === type);
    return n ? { id: n.id, value: n.widgets.find((w) => w.name === 'layout').value, state: n.cones2Layout?.state() } : null;
  }, NODE);
  const editorSel = async (cls) => {
    const id = (await layoutNode()).id;
    // the editor's root is the DOM widget element of this node
    return page.evaluateHandle(([type, nid, c]) => {
      const n = window.app.graph.getNodeById(nid);
      return n.cones2Layout.root.querySelector(c);
    }, [NODE, id, cls]);
  };
  const rect = async () => (await layoutNode()).state.rect;
  // The layout node's editor is on the page. Undo, redo and loading a workflow replace every node with a new
  // one (a new editor); the frontend must show the new editor, under either node renderer.
  const editorShown = (boxes = null) => page.waitForFunction(([type, count]) => {
    const ed = window.app.graph.nodes.find((x) => x.type === type)?.cones2Layout;
    return !!ed && ed.state().shown && (count === null || ed.boxes.length === count);
  }, [NODE, boxes], { timeout: 5000 }).catch(async () => {
    const st = (await layoutNode())?.state;
    throw new Error(`the layout editor is not on the page: ${JSON.stringify(st && { shown: st.shown,
      boxes: st.boxes.length, remounts: st.remounts })}`);
  });
  // The layout's text box as the user sees it: the widget's own element (canvas renderer), else the text area
  // the Vue node renderer draws for it.
  const layoutTextBox = () => page.evaluateHandle((type) => {
    const n = window.app.graph.nodes.find((x) => x.type === type);
    const own = n.widgets.find((w) => w.name === 'layout').element;
    if (own?.isConnected) return own;
    return document.querySelector(`[data-node-id="${n.id}"] [data-widget-name="layout"] textarea`);
  }, NODE);
  const at = (r, fx, fy) => [r.left + fx * r.width, r.top + fy * r.height];
  const drag = async (from, to, steps = 8) => {
    await page.mouse.move(from[0], from[1]);
    await page.mouse.down();
    await page.mouse.move(to[0], to[1], { steps });
    await page.mouse.up();
    await settle(page, 50);
  };
  const frac = (r, p) => ({ x: (p[0] - r.left) / r.width, y: (p[1] - r.top) / r.height });
  const parse = (v) => JSON.parse(v);
  const close = (a, b, tol) => Math.abs(a - b) <= tol;
  const boxIs = (box, exp, tol) => ['x', 'y', 'w', 'h'].every((k) => close(box[k], exp[k], tol));
  const pixel = (fx, fy) => page.evaluate(([type, x, y]) => {
    const c = window.app.graph.nodes.find((n) => n.type === type).cones2Layout.canvas;
    const d = c.getContext('2d').getImageData(Math.floor(x * c.width), Math.floor(y * c.height), 1, 1).data;
    return [d[0], d[1], d[2]];
  }, [NODE, fx, fy]);
  const assert = (cond, msg) => { if (!cond) throw new Error(msg); };
  const shootNode = async (file) => {
    const clip = await page.evaluate((type) => {
      const app = window.app;
      const n = app.graph.nodes.find((x) => x.type === type);
      const th = window.LiteGraph.NODE_TITLE_HEIGHT;
      const [x0, y0] = app.canvasPosToClientPos([n.pos[0] - 6, n.pos[1] - th - 6]);
      const [x1, y1] = app.canvasPosToClientPos([n.pos[0] + n.size[0] + 6, n.pos[1] + n.size[1] + 6]);
      return { x: Math.max(0, x0), y: Math.max(0, y0), width: x1 - Math.max(0, x0), height: y1 - Math.max(0, y0) };
    }, NODE);
    const vp = page.viewportSize();
    clip.width = Math.min(clip.width, vp.width - clip.x);
    clip.height = Math.min(clip.height, vp.height - clip.y);
    await page.screenshot({ path: file, clip });
    return clip;
  };
  // the frontend's api object (what ../../../scripts/api.js exports), to send synthetic "executed" events
  const sendExecuted = (detail) => page.evaluate((d) => {
    window.comfyAPI.api.api.dispatchEvent(new CustomEvent('executed', { detail: d }));
  }, detail);

  const workflow = JSON.parse(fs.readFileSync(workflowPath, 'utf8'));
  // loads a workflow and puts the layout node at zoom 1, in view at the top left; `size` (null: as saved)
  const loadWorkflow = async (wf, size = ROOMY) => {
    await page.evaluate(async ([wf, type, size]) => {
      const app = window.app;
      await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
      await app.loadGraphData(wf);
      const n = app.graph.nodes.find((x) => x.type === type);
      if (size) n.setSize(size);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [-n.pos[0] + 80, -n.pos[1] + 60];
      app.canvas.setDirty(true, true);
    }, [wf, NODE, size]);
    await editorShown();
    await settle(page, 400);
  };

  await step('load_workflow', async () => {
    // at the size the example saves, the drawing has room under either node renderer
    await loadWorkflow(workflow, null);
    const atSaved = (await layoutNode()).state.rect;
    assert(atSaved.width >= 180 && atSaved.height >= 180, `the editor's frame at the node's saved size is too small: `
      + JSON.stringify(atSaved));
    await loadWorkflow(workflow);
    const n = await layoutNode();
    assert(n && n.state, 'the layout node has no editor');
    assert(n.state.boxes.length === 2, `expected the example's 2 boxes, got ${JSON.stringify(n.state.boxes)}`);
    assert(Math.abs(n.state.aspect - 1) < 1e-9, `64x64 latent should give aspect 1, got ${n.state.aspect}`);
    // which frontend and node renderer this run is on: the setting, and whether the node is drawn as a Vue view
    out.frontend = await page.evaluate((id) => ({
      version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
      vueNodes: window.app.extensionManager.setting.get('Comfy.VueNodes.Enabled') ?? null,
      vueNodeView: !!document.querySelector(`[data-node-id="${id}"]`),
    }), n.id);
    return { rect: n.state.rect, rectAtSavedSize: atSaved, boxes: n.state.boxes };
  });

  const expected = {};
  await step('draw_label_move_resize', async () => {
    await (await editorSel('.c2-clear')).click();
    await settle(page, 50);
    assert((await layoutNode()).state.boxes.length === 0, 'Clear left boxes');
    const r = await rect();
    assert(r.width > 200 && r.height > 200, `editor canvas too small: ${JSON.stringify(r)}`);

    // box 1: drag on empty space, then type its subject
    let a = at(r, 0.10, 0.15), b = at(r, 0.45, 0.85);
    await drag(a, b);
    const focused = await page.evaluate(() => document.activeElement?.className);
    assert(/c2-subject/.test(focused), `after drawing, the subject field should have focus, got ${focused}`);
    const words = await page.evaluate((type) => [...window.app.graph.nodes.find((n) => n.type === type)
      .cones2Layout.datalist.options].map((o) => o.value), NODE);
    await page.keyboard.type('dog');
    await settle(page, 30);
    const d1 = { ...frac(r, a) };
    const e1 = frac(r, b);
    expected.dog = { x: d1.x, y: d1.y, w: e1.x - d1.x, h: e1.y - d1.y };

    // box 2, labelled through the field with a per-box weight
    a = at(r, 0.55, 0.30); b = at(r, 0.95, 0.90);
    await drag(a, b);
    await (await editorSel('.c2-subject')).fill('cat');
    const weight = await editorSel('.c2-weight');
    await weight.fill('3');
    await weight.press('Enter');
    await settle(page, 30);
    const d2 = frac(r, a), e2 = frac(r, b);
    expected.cat = { x: d2.x, y: d2.y, w: e2.x - d2.x, h: e2.y - d2.y };

    // move the dog box by dragging its middle
    const dogMid = at(r, expected.dog.x + expected.dog.w / 2, expected.dog.y + expected.dog.h / 2);
    const dx = 0.05 * r.width, dy = -0.08 * r.height;
    await drag(dogMid, [dogMid[0] + dx, dogMid[1] + dy]);
    expected.dog.x += dx / r.width;
    expected.dog.y += dy / r.height;

    // resize the cat box by its bottom-right corner (up-left) and then its left edge (right)
    const corner = at(r, expected.cat.x + expected.cat.w, expected.cat.y + expected.cat.h);
    await drag(corner, [corner[0] - 0.1 * r.width, corner[1] - 0.15 * r.height]);
    expected.cat.w -= 0.1;
    expected.cat.h -= 0.15;
    const left = at(r, expected.cat.x, expected.cat.y + expected.cat.h / 2);
    await drag(left, [left[0] + 0.05 * r.width, left[1]]);
    expected.cat.x += 0.05;
    expected.cat.w -= 0.05;

    const n = await layoutNode();
    const layout = parse(n.value);
    const tol = 1 / r.width + 1e-4;   // one canvas pixel (+ the 4-decimal rounding)
    const byName = Object.fromEntries(layout.boxes.map((bx) => [bx.subject, bx]));
    assert(layout.version === 1 && layout.boxes.length === 2, `layout: ${n.value}`);
    assert(byName.dog && boxIs(byName.dog, expected.dog, tol), `dog ${JSON.stringify(byName.dog)} != ${JSON.stringify(expected.dog)}`);
    assert(byName.cat && boxIs(byName.cat, expected.cat, tol), `cat ${JSON.stringify(byName.cat)} != ${JSON.stringify(expected.cat)}`);
    assert(byName.cat.weight === 3 && !('weight' in byName.dog), `weights: ${n.value}`);
    assert(layout.canvas && layout.canvas.width === 64 && layout.canvas.height === 64, `canvas: ${n.value}`);
    // the canvas shows them: each box's fill differs from the empty background and from the other
    const bg = await pixel(0.02, 0.98);
    const pd = await pixel(expected.dog.x + expected.dog.w / 2, expected.dog.y + expected.dog.h * 0.6);
    const pc = await pixel(expected.cat.x + expected.cat.w / 2, expected.cat.y + expected.cat.h * 0.6);
    const diff = (p, q) => Math.abs(p[0] - q[0]) + Math.abs(p[1] - q[1]) + Math.abs(p[2] - q[2]);
    assert(diff(pd, bg) > 30 && diff(pc, bg) > 30 && diff(pd, pc) > 30, `box colours ${pd} ${pc} bg ${bg}`);
    return { layout, expected, tolerance: tol, words, pixels: { bg, dog: pd, cat: pc } };
  });

  await step('delete_key_and_undo', async () => {
    const r = await rect();
    const before = (await layoutNode()).value;
    await drag(at(r, 0.05, 0.02), at(r, 0.25, 0.12));
    assert((await layoutNode()).state.boxes.length === 3, 'third box not drawn');
    const nodes = await page.evaluate(() => window.app.graph.nodes.length);
    // Delete on the canvas removes the selected box, not the node
    const canvas = await editorSel('canvas');
    await canvas.focus();
    await page.keyboard.press('Delete');
    await settle(page, 100);
    let n = await layoutNode();
    assert(n && n.state.boxes.length === 2, `Delete: ${n && n.value}`);
    assert(n.value === before, 'Delete did not give back the layout before the third box');
    assert(await page.evaluate(() => window.app.graph.nodes.length) === nodes, 'Delete removed a node');
    // the frontend's undo brings the box back, redo removes it again
    await page.keyboard.press('Control+z');
    await editorShown(3);
    await settle(page, 100);
    n = await layoutNode();
    const undone = n.state.boxes.length;
    await (await editorSel('canvas')).focus();
    await page.keyboard.press('Control+y');
    await editorShown(2);
    await settle(page, 100);
    n = await layoutNode();
    assert(n.value === before, 'redo did not restore the two-box layout');
    // with no box selected, Delete in the drawing still leaves the node alone
    await (await editorSel('canvas')).focus();
    await page.keyboard.press('Escape');
    await page.keyboard.press('Delete');
    await settle(page, 100);
    n = await layoutNode();
    assert(n && n.value === before && n.state.selected === -1, 'Delete without a selected box changed something');
    assert(await page.evaluate(() => window.app.graph.nodes.length) === nodes, 'Delete removed the node');
    return { afterUndo: undone, afterRedo: n.state.boxes.length };
  });

  await step('snap_and_delete_button', async () => {
    const r = await rect();
    await (await editorSel('.c2-snap')).check();
    await drag(at(r, 0.07, 0.04), at(r, 0.33, 0.11));
    const n = await layoutNode();
    const last = parse(n.value).boxes[2];
    const onGrid = (v) => Math.abs(v * 16 - Math.round(v * 16)) < 1e-3;
    assert(last && ['x', 'y', 'w', 'h'].every((k) => onGrid(last[k])), `snapped box off the grid: ${JSON.stringify(last)}`);
    await (await editorSel('.c2-delete')).click();
    await (await editorSel('.c2-snap')).uncheck();
    await settle(page, 50);
    assert(parse((await layoutNode()).value).boxes.length === 2, 'Delete button did not remove the box');
    return { snapped: last };
  });

  await step('numeric_edit', async () => {
    // select the cat box by clicking it, then type its x
    const r = await rect();
    const cat = expected.cat;
    await page.mouse.click(...at(r, cat.x + cat.w / 2, cat.y + cat.h / 2));
    await settle(page, 50);
    const xInput = await editorSel('.c2-x');
    await xInput.fill('0.5');
    await xInput.press('Enter');
    await settle(page, 50);
    const box = parse((await layoutNode()).value).boxes.find((b) => b.subject === 'cat');
    assert(Math.abs(box.x - 0.5) < 1e-9 && Math.abs(box.w - cat.w) < 2e-4, `numeric x: ${JSON.stringify(box)}`);
    expected.cat.x = 0.5;
    // a box never leaves the frame: x = 0.9 is clamped to 1 - w
    await xInput.fill('0.9');
    await xInput.press('Enter');
    await settle(page, 50);
    const b2 = parse((await layoutNode()).value).boxes.find((b) => b.subject === 'cat');
    assert(b2.x + b2.w <= 1 + 1e-6 && b2.x > 0.5, `clamp: ${JSON.stringify(b2)}`);
    await xInput.fill('0.5');
    await xInput.press('Enter');
    await settle(page, 50);
    return { cat: box, clamped: b2 };
  });

  await step('queue_prompt', async () => {
    const value = (await layoutNode()).value;
    const hist0 = await (await page.request.get(`${url}/history`)).json();
    // the frontend's own queueing path (what the Run button calls); its boolean is unreliable in 1.27
    // (an empty node_errors object reads as an error), so the server's history is the judge
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    let entry = null, id = null;
    const deadline = Date.now() + 120000;
    while (Date.now() < deadline) {
      const hist = await (await page.request.get(`${url}/history`)).json();
      id = Object.keys(hist).find((k) => !(k in hist0));
      if (id && (hist[id].status?.completed || hist[id].status?.status_str === 'error')) { entry = hist[id]; break; }
      await page.waitForTimeout(250);
    }
    assert(entry, 'the prompt did not finish within 120 s');
    const prompt = entry.prompt[2];
    const ours = Object.values(prompt).find((n) => n.class_type === NODE);
    assert(ours, 'no layout node in the API prompt');
    assert(ours.inputs.layout === value, `API prompt layout differs:\n${ours.inputs.layout}\nvs\n${value}`);
    assert(!('cones2_layout_editor' in ours.inputs), 'the editor widget leaked into the API prompt');
    assert(ours.inputs.guidance_weight === 0.08 && ours.inputs.self_recurrence === false,
      `other inputs shifted: ${JSON.stringify(ours.inputs)}`);
    const status = entry.status?.status_str;
    const messages = entry.status?.messages?.filter(([k]) => k === 'execution_error');
    assert(status === 'success', `run failed: ${JSON.stringify(messages || entry.status).slice(0, 2000)}`);
    const images = Object.values(entry.outputs || {}).flatMap((o) => o.images || []);
    assert(images.length === 2, `expected the image and the attention maps: ${JSON.stringify(entry.outputs)}`);
    return { prompt_id: id, layout: ours.inputs.layout, images, outputs: entry.outputs };
  });

  await step('attention_maps', async () => {
    const { prompt_id: promptId, outputs } = out.steps.queue_prompt;
    const ids = await page.evaluate(() => ({
      maps: window.app.graph.nodes.find((n) => n.type === 'Cones2AttentionMaps').id,
      sampler: window.app.graph.nodes.find((n) => n.type === 'KSampler').id,
    }));
    const payload = outputs[String(ids.maps)]?.cones2_maps;
    assert(Array.isArray(payload) && payload.length === 2, `no cones2_maps in the run's outputs: ${JSON.stringify(outputs)}`);
    // the websocket's "executed" event of the maps node reached the editor of the node feeding its model
    await page.waitForFunction(([type, pid]) => window.app.graph.nodes.find((n) => n.type === type)
      .cones2Layout.maps?.prompt === pid, [NODE, promptId], { timeout: 15000 });
    let st = (await layoutNode()).state;
    assert(JSON.stringify(st.maps.subjects.map((m) => [m.subject, m.h, m.w, m.share]))
      === JSON.stringify(payload.map((m) => [m.subject, m.h, m.w, m.share])), `maps kept: ${JSON.stringify(st.maps)}`);
    assert(!st.showMaps && !st.mapsShown && st.labels.every((l) => !/%/.test(l)), `maps shown before the toggle: ${st.labels}`);
    const before = (await layoutNode()).value;
    const grab = (key) => page.evaluate(([type, k]) => {
      const c = window.app.graph.nodes.find((n) => n.type === type).cones2Layout.canvas;
      window.__cones2Pixels = window.__cones2Pixels || {};
      window.__cones2Pixels[k] = c.getContext('2d').getImageData(0, 0, c.width, c.height).data.slice();
      return [c.width, c.height];
    }, [NODE, key]);
    // per box: how many pixels differ between two snapshots (and how many outside every box)
    const compare = (a, b) => page.evaluate(([type, ka, kb]) => {
      const ed = window.app.graph.nodes.find((n) => n.type === type).cones2Layout;
      const W = ed.canvas.width, H = ed.canvas.height;
      const A = window.__cones2Pixels[ka], B = window.__cones2Pixels[kb];
      if (A.length !== B.length) return { sizeChanged: true };
      const boxes = ed.boxes.map((bx) => ({ subject: bx.subject, x0: Math.ceil(bx.x * W), x1: Math.floor((bx.x + bx.w) * W),
        y0: Math.ceil(bx.y * H), y1: Math.floor((bx.y + bx.h) * H), changed: 0, total: 0 }));
      let outside = 0, total = 0;
      for (let y = 0; y < H; y++) {
        for (let x = 0; x < W; x++) {
          const i = 4 * (y * W + x);
          const diff = Math.abs(A[i] - B[i]) + Math.abs(A[i + 1] - B[i + 1]) + Math.abs(A[i + 2] - B[i + 2]) > 12;
          if (diff) total++;
          let inside = false;
          for (const bx of boxes) {
            if (x >= bx.x0 && x < bx.x1 && y >= bx.y0 && y < bx.y1) { inside = true; bx.total++; if (diff) bx.changed++; }
          }
          if (!inside && diff) outside++;
        }
      }
      return { boxes: boxes.map(({ subject, changed, total: t }) => ({ subject, changed, total: t })), outside, total };
    }, [NODE, a, b]);
    await grab('off');
    // toggle on: the heatmaps appear under the boxes, the labels carry the shares
    await (await editorSel('.c2-maps')).check();
    await settle(page, 100);
    st = (await layoutNode()).state;
    assert(st.showMaps && st.mapsShown, `toggle on: ${JSON.stringify(st)}`);
    await grab('on');
    const onDiff = await compare('off', 'on');
    for (const bx of onDiff.boxes) {
      assert(bx.total > 100 && bx.changed > 0.25 * bx.total, `maps on: few pixels changed in the ${bx.subject} box: ${JSON.stringify(onDiff)}`);
    }
    const pct = Object.fromEntries(payload.map((m) => [m.subject, Math.round(m.share * 100)]));
    const labels = st.labels;
    assert(labels.length === st.boxes.length, `one label drawn per box: ${labels} for ${JSON.stringify(st.boxes)}`);
    for (const [subject, p] of Object.entries(pct)) {
      assert(labels.some((l) => l.startsWith(subject) && l.endsWith(` ${p}%`)), `no "${subject} … ${p}%" label: ${labels}`);
    }
    assert((await layoutNode()).value === before, 'showing the maps changed the layout text');
    // nothing of the maps is saved: not in the workflow, not in the API prompt
    const saved = await page.evaluate(async () => {
      const wf = JSON.stringify(window.app.graph.serialize());
      const api = JSON.stringify((await window.app.graphToPrompt()).output);
      return { wf, api };
    });
    for (const [what, text] of Object.entries(saved)) {
      assert(!text.includes('cones2_maps') && !/"values"\s*:/.test(text) && !/data:image/.test(text),
        `the maps leaked into the ${what}`);
    }
    await settle(page, 200);
    const clip = await shootNode(mapsShotPath);

    // another node's event is ignored; a new run of the maps node replaces the maps
    await sendExecuted({ node: String(ids.sampler), display_node: String(ids.sampler), prompt_id: 'other',
      output: { cones2_maps: [{ subject: 'dog', h: 1, w: 1, share: 0.5, values: [1] }] } });
    await settle(page, 50);
    assert((await layoutNode()).state.maps.prompt === promptId, 'an event of another node replaced the maps');
    await sendExecuted({ node: String(ids.maps), display_node: String(ids.maps), prompt_id: 'rerun',
      output: { text: ['x'], cones2_maps: [{ subject: 'dog', h: 2, w: 2, share: 0.5, values: [1, 0, 0, 0] }] } });
    await settle(page, 50);
    st = (await layoutNode()).state;
    assert(st.maps.prompt === 'rerun' && st.maps.subjects.length === 1, `rerun: ${JSON.stringify(st.maps)}`);
    assert(st.labels.some((l) => l === 'dog 50%') && st.labels.every((l) => !l.startsWith('cat') || !/%/.test(l)),
      `rerun labels: ${st.labels}`);
    await sendExecuted({ node: String(ids.maps), display_node: String(ids.maps), prompt_id: promptId,
      output: outputs[String(ids.maps)] });
    await settle(page, 50);
    await grab('on2');
    const again = await compare('on', 'on2');
    assert(again.total === 0, `the real maps did not come back as drawn before: ${JSON.stringify(again)}`);

    // toggle off: exactly the pixels of before
    await (await editorSel('.c2-maps')).uncheck();
    await settle(page, 100);
    st = (await layoutNode()).state;
    await grab('off2');
    const offDiff = await compare('off', 'off2');
    assert(!st.mapsShown && offDiff.total === 0, `toggle off did not restore the canvas: ${JSON.stringify(offDiff)}`);
    assert(st.labels.every((l) => !/%/.test(l)), `labels after off: ${st.labels}`);
    return { payload: payload.map(({ subject, h, w, share }) => ({ subject, h, w, share })), labels,
      changed: onDiff, clip, path: mapsShotPath };
  });

  let saved;
  await step('save_reload_load', async () => {
    const before = await layoutNode();
    saved = await page.evaluate(() => JSON.parse(JSON.stringify(window.app.graph.serialize())));
    const sn = saved.nodes.find((x) => x.type === NODE);
    assert(sn.widgets_values[0] === before.value, 'widgets_values[0] is not the layout');
    assert(sn.widgets_values.length === 11 && sn.widgets_values[1] === 0.08,
      `widgets_values shifted: ${JSON.stringify(sn.widgets_values)}`);
    const text = JSON.stringify(saved);
    assert(!/data:image/.test(text), 'an image was embedded in the workflow');
    await gotoComfy(page, url);
    // the saved workflow under another graph id: its layout node has the id of the one the page restored
    await loadWorkflow({ ...saved, id: '1c0e55e2-0000-4000-8000-00000000c0e5' });
    const after = await layoutNode();
    assert(after.value === before.value, 'layout text changed through save/load');
    const round = (bs) => bs.map(({ subject, x, y, w, h, weight }) =>
      [subject, ...[x, y, w, h].map((v) => Math.round(v * 1e4)), weight ?? null]);
    assert(JSON.stringify(round(after.state.boxes)) === JSON.stringify(round(before.state.boxes)),
      `boxes differ after reload: ${JSON.stringify(after.state.boxes)}`);
    assert(after.state.labels.length === 2, 'canvas did not draw the reloaded boxes');
    return { boxes: after.state.boxes };
  });

  await step('copy_paste_remove', async () => {
    const r = await page.evaluate((type) => {
      const app = window.app;
      const n = app.graph.nodes.find((x) => x.type === type);
      app.canvas.copyToClipboard([n]);
      app.canvas.graph_mouse[0] = n.pos[0] + 600;
      app.canvas.graph_mouse[1] = n.pos[1];
      app.canvas.pasteFromClipboard();
      const all = app.graph.nodes.filter((x) => x.type === type);
      const copy = all.find((x) => x !== n);
      const res = {
        count: all.length,
        same: copy && copy.widgets.find((w) => w.name === 'layout').value === n.widgets.find((w) => w.name === 'layout').value,
        copyBoxes: copy?.cones2Layout?.boxes.length,
        ownEditor: copy && copy.cones2Layout && copy.cones2Layout !== n.cones2Layout,
      };
      const root = copy?.cones2Layout?.root;
      const copyEditor = copy?.cones2Layout;
      app.graph.remove(copy);
      res.cleaned = root ? !root.isConnected : false;
      // its "executed" listener went with it; the original's stays
      const seen = [copyEditor?.mapEvents, n.cones2Layout.mapEvents];
      window.comfyAPI.api.api.dispatchEvent(new CustomEvent('executed', { detail: { node: '99999', output: {} } }));
      res.listening = [copyEditor?.mapEvents - seen[0], n.cones2Layout.mapEvents - seen[1]];
      res.countAfter = app.graph.nodes.filter((x) => x.type === type).length;
      return res;
    }, NODE);
    assert(r.count === 2 && r.same && r.copyBoxes === 2 && r.ownEditor, `paste: ${JSON.stringify(r)}`);
    assert(r.cleaned && r.countAfter === 1, `remove: ${JSON.stringify(r)}`);
    assert(r.listening[0] === 0 && r.listening[1] === 1, `listeners after removal: ${JSON.stringify(r)}`);
    return r;
  });

  await step('edit_json_text', async () => {
    const textarea = await layoutTextBox();
    assert(await textarea.evaluate((e) => e && e.isConnected && e.tagName === 'TEXTAREA'), 'no layout text box on the page');
    const redraws0 = (await layoutNode()).state.redraws;
    const bg = await pixel(0.9, 0.1);
    const text = '{"version": 1, "boxes": [\n  {"subject": "dog", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.5},\n'
      + '  {"subject": "cat", "x": 0.6, "y": 0.05, "w": 0.35, "h": 0.3, "weight": 4},\n'
      + '  {"subject": "sofa", "x": 0, "y": 0.75, "w": 1, "h": 0.25}\n]}';
    await textarea.fill(text);
    await settle(page, 50);
    let n = await layoutNode();
    assert(n.state.boxes.length === 3 && n.state.redraws > redraws0, `text edit not shown: ${JSON.stringify(n.state)}`);
    assert(boxIs(n.state.boxes[1], { x: 0.6, y: 0.05, w: 0.35, h: 0.3 }, 1e-9), 'cat box not from the text');
    const catPixel = await pixel(0.9, 0.1);
    assert(Math.abs(catPixel[0] - bg[0]) + Math.abs(catPixel[1] - bg[1]) + Math.abs(catPixel[2] - bg[2]) > 30,
      `canvas not redrawn at the new cat box: ${catPixel} vs ${bg}`);
    // broken JSON: the canvas keeps the last valid boxes and says what is wrong
    await textarea.fill('{"version": 1, "boxes": [');
    await settle(page, 50);
    n = await layoutNode();
    const status = await page.evaluate((type) => {
      const s = window.app.graph.nodes.find((x) => x.type === type).cones2Layout.status;
      return { text: s.textContent, error: s.classList.contains('c2-error') };
    }, NODE);
    assert(n.state.error && status.error && n.state.boxes.length === 3, `bad JSON: ${JSON.stringify(status)}`);
    await textarea.fill(text);
    await settle(page, 50);
    n = await layoutNode();
    assert(!n.state.error && n.state.boxes.length === 3, 'did not recover from bad JSON');
    // a layout the node would refuse is still drawn, and the status line says why
    await textarea.fill('{"version": 1, "boxes": [{"subject": " ", "x": 0.1, "y": 0.2, "w": 0.3, "h": 0.5}]}');
    await settle(page, 50);
    n = await layoutNode();
    const refused = await page.evaluate((type) => {
      const s = window.app.graph.nodes.find((x) => x.type === type).cones2Layout.status;
      return { text: s.textContent, refused: s.classList.contains('c2-refused'), error: s.classList.contains('c2-error') };
    }, NODE);
    assert(!n.state.error && n.state.boxes.length === 1 && /has no subject/.test(n.state.refusal)
      && refused.refused && !refused.error && refused.text.includes('has no subject'), `refused: ${JSON.stringify(refused)}`);
    await textarea.fill(text);
    await settle(page, 50);
    n = await layoutNode();
    assert(!n.state.refusal && n.state.boxes.length === 3, 'the valid layout still reads as refused');
    return { status, refused };
  });

  await step('aspect_from_latent', async () => {
    const setW = (w) => page.evaluate((w) => {
      const l = window.app.graph.nodes.find((n) => n.type === 'EmptyLatentImage');
      l.widgets.find((x) => x.name === 'width').value = w;
      window.app.canvas.setDirty(true, true);
    }, w);
    await setW(128);
    await settle(page, 200);
    const n = await layoutNode();
    const ratio = n.state.rect.width / n.state.rect.height;
    await setW(64);
    await settle(page, 200);
    const back = (await layoutNode()).state;
    assert(Math.abs(n.state.aspect - 2) < 1e-9 && Math.abs(ratio - 2) < 0.03, `128x64: aspect ${n.state.aspect} ratio ${ratio}`);
    assert(Math.abs(back.aspect - 1) < 1e-9, 'aspect did not follow the latent back to square');
    return { ratio };
  });

  await step('screenshot', async () => {
    // select the cat box so the highlight and handles show, then shoot the node
    const r = await rect();
    await page.mouse.click(...at(r, 0.775, 0.2));
    await settle(page, 200);
    const clip = await shootNode(shotPath);
    return { clip, path: shotPath };
  });

  // Flux: the prompt reaches Layout Guidance through FluxGuidance (Apply Residuals -> FluxGuidance -> Layout
  // Guidance); the subject suggestions still come from the prompt. Loaded into the same page (no reload).
  if (fluxWorkflowPath) {
    await step('flux_prompt_words', async () => {
      await loadWorkflow(JSON.parse(fs.readFileSync(fluxWorkflowPath, 'utf8')));
      const chain = await page.evaluate((type) => {
        const names = [];
        let n = window.app.graph.nodes.find((x) => x.type === type);
        for (let i = 0; i < 2 && n; i++) {
          n = n.getInputNode(n.inputs.findIndex((x) => x.name === 'conditioning'));
          names.push(n?.type);
        }
        return { names, text: n?.widgets?.find((w) => w.name === 'text')?.value };
      }, NODE);
      assert(JSON.stringify(chain.names) === '["FluxGuidance","Cones2ApplyResiduals"]',
        `not the Flux chain: ${JSON.stringify(chain)}`);
      const n = await layoutNode();
      assert(n.state.boxes.length === 2 && Math.abs(n.state.aspect - 1) < 1e-9,
        `Flux layout: ${JSON.stringify(n.state)}`);
      // select the cat box on the canvas, then focus its subject field as a user would
      await page.mouse.click(...at(n.state.rect, 0.75, 0.6));
      await settle(page, 50);
      const field = await editorSel('.c2-subject');
      await field.click();
      await settle(page, 50);
      const subject = await field.inputValue();
      const words = await page.evaluate((type) => [...window.app.graph.nodes.find((x) => x.type === type)
        .cones2Layout.datalist.options].map((o) => o.value), NODE);
      assert(subject === 'cat', `the cat box is not selected: the field says ${JSON.stringify(subject)}`);
      return { chain, words };
    });
  }

  // Switching the node renderer while a workflow is open: the editor moves between the canvas's DOM widget layer
  // and the Vue node view, and keeps drawing its boxes in both.
  if ('Comfy.VueNodes.Enabled' in settings) {
    await step('switch_renderer', async () => {
      const seen = [];
      for (const on of [!settings['Comfy.VueNodes.Enabled'], settings['Comfy.VueNodes.Enabled']]) {
        await page.evaluate((v) => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', v), on);
        await settle(page, 600);
        await editorShown(2);
        const n = await layoutNode();
        const r = n.state.rect;
        const vueView = await page.evaluate((id) => !!document.querySelector(`[data-node-id="${id}"]`), n.id);
        const renderer = on ? 'Vue' : 'canvas';
        assert(vueView === on, `renderer ${renderer}: the node's view is ${vueView ? 'Vue' : 'canvas'}`);
        assert(r.width > 100 && r.height > 100, `renderer ${renderer}: frame ${JSON.stringify(r)}`);
        // a click in each box selects it, a click on empty space deselects: the mouse reaches the drawing
        const picked = [];
        for (const b of n.state.boxes) {
          await page.mouse.click(...at(r, b.x + b.w / 2, b.y + b.h / 2));
          await settle(page, 50);
          picked.push((await layoutNode()).state.selected);
        }
        assert(JSON.stringify(picked) === '[0,1]', `renderer ${renderer}: clicks in the boxes selected ${picked}`);
        seen.push({ vueNodes: on, vueView, rect: r, picked });
      }
      return { seen };
    });
  }
}
