// Rebuilds workflows/two_subjects_layout.json through the real frontend (so the UI format matches the
// served frontend exactly):  node tests/browser/make_workflow.js http://127.0.0.1:8188 > workflows/two_subjects_layout.json
'use strict';
const { openComfy } = require('./browser_common');

(async () => {
  const url = process.argv[2] || 'http://127.0.0.1:8188';
  const { browser, page } = await openComfy(url);
  const wf = await page.evaluate(() => {
    const { app, LiteGraph } = window;
    app.graph.clear();
    const add = (type, pos, values = {}) => {
      const n = LiteGraph.createNode(type);
      n.pos = pos;
      app.graph.add(n);
      for (const [k, v] of Object.entries(values)) n.widgets.find((w) => w.name === k).value = v;
      return n;
    };
    const ckpt = add('CheckpointLoaderSimple', [20, 200], { ckpt_name: 'cones2_tiny_sd15.safetensors' });
    const pos = add('Cones2ApplyResiduals', [380, 60], { text: 'a dog and a cat on a sofa' });
    pos.size = [400, 160];
    const layout = add('Cones2LayoutGuidance', [820, 60], {
      layout: '{"version": 1, "canvas": {"width": 64, "height": 64}, "boxes": [\n'
        + '  {"subject": "dog", "x": 0.05, "y": 0.2, "w": 0.42, "h": 0.7},\n'
        + '  {"subject": "cat", "x": 0.55, "y": 0.3, "w": 0.4, "h": 0.6}\n]}',
    });
    const neg = add('CLIPTextEncode', [380, 300], { text: '' });
    neg.size = [400, 140];
    const latent = add('EmptyLatentImage', [380, 500], { width: 64, height: 64, batch_size: 1 });
    const ks = add('KSampler', [1300, 60], { seed: 1, steps: 2, cfg: 5, sampler_name: 'euler', scheduler: 'normal' });
    const cs = ks.widgets.find((w) => w.name === 'control_after_generate');
    if (cs) cs.value = 'fixed';
    const dec = add('VAEDecode', [1640, 60]);
    const save = add('SaveImage', [1640, 200], { filename_prefix: 'cones2_layout' });
    save.size = [300, 300];
    const link = (a, ai, b, bname) => a.connect(ai, b, b.inputs.findIndex((i) => i.name === bname));
    link(ckpt, 0, layout, 'model');
    link(ckpt, 1, pos, 'clip');
    link(ckpt, 1, neg, 'clip');
    link(pos, 0, layout, 'conditioning');
    link(layout, 0, ks, 'model');
    link(layout, 1, ks, 'positive');
    link(neg, 0, ks, 'negative');
    link(latent, 0, ks, 'latent_image');
    link(ks, 0, dec, 'samples');
    link(ckpt, 2, dec, 'vae');
    link(dec, 0, save, 'images');
    return app.graph.serialize();
  });
  process.stdout.write(JSON.stringify(wf, null, 1) + '\n');
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
