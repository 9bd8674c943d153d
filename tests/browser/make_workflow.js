// Builds the pack's example workflows (workflows/*.json) through the real frontend, so their UI format is
// exactly what the served frontend saves. Needs a ComfyUI server with this pack, the tiny SD1.5 checkpoint and
// the files the workflows name (LoRA, ControlNet, demo residuals, input images); the one-line way is
//   python harness/tiny_extras.py --comfyui ~/ComfyUI --make-workflows [--ckpt-dir /tmp/tinyck]
// which builds those files, starts such a server and runs, in effect,
//   node tests/browser/make_workflow.js http://127.0.0.1:PORT workflows/
// Files are written atomically; one line per file is printed. Values are what a user should start from (the
// tests override steps and sizes where they run a workflow); names match harness/tiny_extras.py.
'use strict';
const fs = require('fs');
const path = require('path');
const { openComfy } = require('./browser_common');

const CKPT = 'cones2_tiny_sd15.safetensors';
// The files a Flux user downloads (the note names them); tests/host/test_workflows.py puts the tiny Flux bed's files
// in their place (its FAMILY_WORKFLOWS table).
const FLUX = {
  unet: 'flux1-dev.safetensors', clipL: 'clip_l.safetensors', t5: 't5xxl_fp16.safetensors', vae: 'ae.safetensors',
};
const LAYOUT_2 = (a, b) => '{"version": 1, "canvas": {"width": 64, "height": 64}, "boxes": [\n'
  + `  {"subject": "${a}", "x": 0.05, "y": 0.2, "w": 0.42, "h": 0.7},\n`
  + `  {"subject": "${b}", "x": 0.55, "y": 0.3, "w": 0.4, "h": 0.6}\n]}`;
const LAYOUT_3 = '{"version": 1, "canvas": {"width": 64, "height": 64}, "boxes": [\n'
  + '  {"subject": "dog", "x": 0.02, "y": 0.35, "w": 0.32, "h": 0.6},\n'
  + '  {"subject": "cat", "x": 0.36, "y": 0.45, "w": 0.28, "h": 0.5},\n'
  + '  {"subject": "bear", "x": 0.66, "y": 0.15, "w": 0.32, "h": 0.8}\n]}';

// Runs in the page: one builder per workflow, each on a cleared graph; returns {name: serialised graph}.
function buildAll(spec) {
  const { app, LiteGraph } = window;
  const add = (type, pos, values = {}, size = null) => {
    const n = LiteGraph.createNode(type);
    if (!n) throw new Error(`unknown node type ${type}`);
    n.pos = pos;
    app.graph.add(n);
    for (const [k, v] of Object.entries(values)) {
      const w = (n.widgets || []).find((x) => x.name === k);
      if (!w) throw new Error(`${type} has no widget ${k}`);
      w.value = v;
    }
    if (size) n.size = size;
    return n;
  };
  const fixSeed = (n) => {
    const cs = n.widgets.find((w) => w.name === 'control_after_generate');
    if (cs) cs.value = 'fixed';
  };
  const link = (a, ai, b, bname) => {
    const slot = b.inputs.findIndex((i) => i.name === bname);
    if (slot < 0) throw new Error(`${b.type} has no input ${bname}`);
    if (!a.connect(ai, b, slot)) throw new Error(`cannot connect ${a.type}[${ai}] -> ${b.type}.${bname}`);
  };
  const note = (pos, text, size = [380, 160]) => add('Note', pos, {}, size).widgets[0].value = text;
  const sampler = (pos, steps) => {
    const ks = add('KSampler', pos, { seed: 1, steps, cfg: 5, sampler_name: 'euler', scheduler: 'normal' });
    fixSeed(ks);
    return ks;
  };
  const out = {};

  // 1. Train a residual from a few images of the subject.
  app.graph.clear();
  {
    const ckpt = add('CheckpointLoaderSimple', [20, 120], { ckpt_name: spec.ckpt });
    const img = add('LoadImage', [20, 300], { image: spec.trainImage }, [320, 360]);
    const train = add('Cones2TrainResidual', [420, 120], { subject: 'dog', save_name: 'my_dog' }, [380, 420]);
    fixSeed(train);
    const prev = add('PreviewImage', [860, 120], {}, [420, 320]);
    link(ckpt, 0, train, 'model');
    link(ckpt, 1, train, 'clip');
    link(ckpt, 2, train, 'vae');
    link(img, 0, train, 'images');
    link(train, 2, prev, 'images');
    note([860, 480], 'Train a Cones 2 residual for one subject from 3-5 images of it (batch them into "images" or '
      + 'name a folder under ComfyUI/input in "image_folder"). The residual is saved as '
      + 'models/cones2_residuals/<save_name>.safetensors; press R to see it in Cones2 Load Residual. '
      + 'steps 0 = automatic: "fast" mode (the default, 100 steps) optimises the residual directly; "paper" mode '
      + 'follows the paper (4000 steps, SD1.5/SD2.x/SDXL only, much slower). '
      + 'The preview shows the loss curve.');
  }
  out.train_residual = app.graph.serialize();

  // 2. Two trained subjects, placed by a layout; the attention maps show where each word attended.
  const layoutGraph = (withResiduals) => {
    const ckpt = add('CheckpointLoaderSimple', [20, 240], { ckpt_name: spec.ckpt });
    const pos = add('Cones2ApplyResiduals', [420, 60],
      { text: withResiduals ? 'a dog and a cat on a sofa' : 'a cat and a dog on a sofa' }, [400, 160]);
    if (withResiduals) {
      const dog = add('Cones2LoadResidual', [20, -260], { residual_name: 'demo_dog.safetensors', strength: 1.0 });
      const cat = add('Cones2LoadResidual', [20, -80], { residual_name: 'demo_cat.safetensors', strength: 1.0 });
      link(dog, 0, cat, 'residuals');
      link(cat, 0, pos, 'residuals');
    }
    const layout = add('Cones2LayoutGuidance', [860, 60],
      { layout: withResiduals ? spec.layoutDogCat : spec.layoutCatDog, record_maps: true });
    const neg = add('CLIPTextEncode', [420, 280], { text: '' }, [400, 140]);
    const latent = add('EmptyLatentImage', [420, 480], { width: 64, height: 64, batch_size: 1 });
    const ks = sampler([1340, 60], 3);
    const dec = add('VAEDecode', [1680, 60]);
    const save = add('SaveImage', [1680, 180], { filename_prefix: withResiduals ? 'cones2_layout' : 'cones2_layout_only' },
      [300, 300]);
    const maps = add('Cones2AttentionMaps', [1340, 420], { resolution: 'largest', panel_size: 256 });
    const saveMaps = add('SaveImage', [1680, 520],
      { filename_prefix: withResiduals ? 'cones2_layout_maps' : 'cones2_layout_only_maps' }, [420, 300]);
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
    link(layout, 0, maps, 'model');
    link(ks, 0, maps, 'samples');
    link(maps, 0, saveMaps, 'images');
    return ckpt;
  };
  app.graph.clear();
  layoutGraph(true);
  // No Note here: the browser tests and the demo load this one as the plain two-subject graph.
  out.two_subjects_layout = app.graph.serialize();

  // 3. Layout guidance alone: a plain prompt, no residuals.
  app.graph.clear();
  layoutGraph(false);
  note([420, 680], 'Layout guidance without residuals: Cones2 Apply Residuals to Conditioning with nothing '
    + 'connected to "residuals" encodes the prompt like CLIP Text Encode and records where its words are, so '
    + 'the boxes can name any word of the prompt.');
  out.layout_only = app.graph.serialize();

  // 4. Three subjects with a LoRA and a ControlNet in the same graph.
  app.graph.clear();
  {
    const ckpt = add('CheckpointLoaderSimple', [20, 300], { ckpt_name: spec.ckpt });
    const lora = add('LoraLoaderModelOnly', [20, 460], { lora_name: spec.lora, strength_model: 0.8 });
    const dog = add('Cones2LoadResidual', [20, -280], { residual_name: 'demo_dog.safetensors' });
    const cat = add('Cones2LoadResidual', [20, -100], { residual_name: 'demo_cat.safetensors' });
    const bear = add('Cones2LoadResidual', [20, 80], { residual_name: 'demo_bear.safetensors' });
    const pos = add('Cones2ApplyResiduals', [420, 0], { text: 'a dog, a cat and a bear in a living room' }, [400, 160]);
    const neg = add('CLIPTextEncode', [420, 220], { text: '' }, [400, 140]);
    const cnLoad = add('ControlNetLoader', [420, 420], { control_net_name: spec.controlnet });
    const cnImg = add('LoadImage', [420, 540], { image: spec.controlImage }, [320, 360]);
    const cn = add('ControlNetApplyAdvanced', [860, 160],
      { strength: 0.6, start_percent: 0.0, end_percent: 1.0 });
    const layout = add('Cones2LayoutGuidance', [1240, 0], { layout: spec.layout3, record_maps: true });
    const latent = add('EmptyLatentImage', [860, 480], { width: 64, height: 64, batch_size: 1 });
    const ks = sampler([1720, 0], 3);
    const dec = add('VAEDecode', [2060, 0]);
    const save = add('SaveImage', [2060, 120], { filename_prefix: 'cones2_mixed' }, [300, 300]);
    const maps = add('Cones2AttentionMaps', [1720, 380], { resolution: 'largest', panel_size: 256 });
    const saveMaps = add('SaveImage', [2060, 480], { filename_prefix: 'cones2_mixed_maps' }, [520, 300]);
    link(dog, 0, cat, 'residuals');
    link(cat, 0, bear, 'residuals');
    link(bear, 0, pos, 'residuals');
    link(ckpt, 0, lora, 'model');
    link(ckpt, 1, pos, 'clip');
    link(ckpt, 1, neg, 'clip');
    link(pos, 0, cn, 'positive');
    link(neg, 0, cn, 'negative');
    link(cnLoad, 0, cn, 'control_net');
    link(cnImg, 0, cn, 'image');
    link(ckpt, 2, cn, 'vae');
    link(lora, 0, layout, 'model');
    link(cn, 0, layout, 'conditioning');
    link(layout, 0, ks, 'model');
    link(layout, 1, ks, 'positive');
    link(cn, 1, ks, 'negative');
    link(latent, 0, ks, 'latent_image');
    link(ks, 0, dec, 'samples');
    link(ckpt, 2, dec, 'vae');
    link(dec, 0, save, 'images');
    link(layout, 0, maps, 'model');
    link(ks, 0, maps, 'samples');
    link(maps, 0, saveMaps, 'images');
    note([860, 620], 'Cones 2 composes with the rest of ComfyUI: a LoRA patches the UNet weights, the ControlNet '
      + 'adds its hint to the conditioning (the word positions recorded by Apply Residuals pass through), and '
      + 'Layout Guidance places the three subjects. Swap the tiny test models for real ones (an SD1.5 LoRA and '
      + 'ControlNet with an SD1.5 checkpoint).');
  }
  out.mixed_controlnet_lora = app.graph.serialize();

  // 5. Flux: two subjects placed by a layout on Flux's joint attention (cfg 1, the guidance value from
  // FluxGuidance, 16-channel latents).
  app.graph.clear();
  {
    const f = spec.flux;
    const unet = add('UNETLoader', [20, 60], { unet_name: f.unet, weight_dtype: 'default' });
    const clip = add('DualCLIPLoader', [20, 200], { clip_name1: f.clipL, clip_name2: f.t5, type: 'flux' });
    const vae = add('VAELoader', [20, 380], { vae_name: f.vae });
    const pos = add('Cones2ApplyResiduals', [420, 60], { text: spec.fluxPrompt }, [400, 160]);
    const fg = add('FluxGuidance', [860, 60], { guidance: 3.5 });
    const layout = add('Cones2LayoutGuidance', [1200, 60], { layout: spec.layoutFlux, record_maps: true });
    const neg = add('CLIPTextEncode', [420, 280], { text: '' }, [400, 140]);
    const latent = add('EmptySD3LatentImage', [420, 480], { width: 1024, height: 1024, batch_size: 1 });
    const ks = add('KSampler', [1680, 60], { seed: 1, steps: 20, cfg: 1.0, sampler_name: 'euler', scheduler: 'simple' });
    fixSeed(ks);
    const dec = add('VAEDecode', [2020, 60]);
    const save = add('SaveImage', [2020, 180], { filename_prefix: 'cones2_flux_layout' }, [300, 300]);
    const maps = add('Cones2AttentionMaps', [1680, 420], { resolution: 'largest', panel_size: 256 });
    const saveMaps = add('SaveImage', [2020, 520], { filename_prefix: 'cones2_flux_layout_maps' }, [420, 300]);
    link(clip, 0, pos, 'clip');
    link(clip, 0, neg, 'clip');
    link(pos, 0, fg, 'conditioning');
    link(unet, 0, layout, 'model');
    link(fg, 0, layout, 'conditioning');
    link(layout, 0, ks, 'model');
    link(layout, 1, ks, 'positive');
    link(neg, 0, ks, 'negative');
    link(latent, 0, ks, 'latent_image');
    link(ks, 0, dec, 'samples');
    link(vae, 0, dec, 'vae');
    link(dec, 0, save, 'images');
    link(layout, 0, maps, 'model');
    link(ks, 0, maps, 'samples');
    link(maps, 0, saveMaps, 'images');
    note([20, 680], 'Cones 2 on Flux. Download a Flux transformer (flux1-dev.safetensors, or '
      + 'flux1-schnell.safetensors) into models/diffusion_models, clip_l.safetensors and t5xxl_fp16.safetensors (or '
      + 't5xxl_fp8_e4m3fn.safetensors) into models/text_encoders and the Flux VAE ae.safetensors into models/vae, '
      + 'and pick them in the three loaders (DualCLIPLoader: clip_l, t5xxl, type flux). '
      + 'Apply Residuals encodes the prompt like CLIP Text Encode and records where its words sit in the T5 '
      + 'rows; chain Cones2 Load Residual nodes with Flux residuals (family flux) into "residuals" to add your '
      + 'own subjects. FluxGuidance sets the distilled guidance (3.5 for dev); sample at cfg 1 (schnell: 4 steps). '
      + 'Layout Guidance biases Flux\'s joint attention: image queries x each subject\'s T5 keys, inside its box '
      + 'up, outside down; Attention Maps shows where each word attended. More in the pack\'s README: '
      + 'Cones2 Layout Guidance > Flux (joint attention).', [560, 220]);
  }
  out.flux_two_subjects_layout = app.graph.serialize();

  // 6. SD3.5: one checkpoint with its three text encoders (CheckpointLoaderSimple), real CFG and a negative prompt;
  // the MMDiT's joint attention is guided like Flux's, with no FluxGuidance.
  app.graph.clear();
  {
    const ckpt = add('CheckpointLoaderSimple', [20, 200], { ckpt_name: spec.sd3Ckpt });
    const pos = add('Cones2ApplyResiduals', [420, 60], { text: spec.fluxPrompt }, [400, 160]);
    const layout = add('Cones2LayoutGuidance', [1200, 60], { layout: spec.layoutFlux, record_maps: true });
    const neg = add('CLIPTextEncode', [420, 280], { text: '' }, [400, 140]);
    const latent = add('EmptySD3LatentImage', [420, 480], { width: 1024, height: 1024, batch_size: 1 });
    const ks = add('KSampler', [1680, 60],
      { seed: 1, steps: 30, cfg: 4.5, sampler_name: 'euler', scheduler: 'sgm_uniform' });
    fixSeed(ks);
    const dec = add('VAEDecode', [2020, 60]);
    const save = add('SaveImage', [2020, 180], { filename_prefix: 'cones2_sd3_layout' }, [300, 300]);
    const maps = add('Cones2AttentionMaps', [1680, 420], { resolution: 'largest', panel_size: 256 });
    const saveMaps = add('SaveImage', [2020, 520], { filename_prefix: 'cones2_sd3_layout_maps' }, [420, 300]);
    link(ckpt, 1, pos, 'clip');
    link(ckpt, 1, neg, 'clip');
    link(ckpt, 0, layout, 'model');
    link(pos, 0, layout, 'conditioning');
    link(layout, 0, ks, 'model');
    link(layout, 1, ks, 'positive');
    link(neg, 0, ks, 'negative');
    link(latent, 0, ks, 'latent_image');
    link(ks, 0, dec, 'samples');
    link(ckpt, 2, dec, 'vae');
    link(dec, 0, save, 'images');
    link(layout, 0, maps, 'model');
    link(ks, 0, maps, 'samples');
    link(maps, 0, saveMaps, 'images');
    note([20, 680], 'Cones 2 on SD3.5 (medium or large). Download sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors '
      + '(from Comfy-Org/stable-diffusion-3.5-fp8; the transformer, the VAE and the three text encoders in '
      + 'one file; sd3.5_large_fp8_scaled.safetensors works the same way) into models/checkpoints and pick it '
      + 'in the checkpoint loader. With stabilityai\'s own sd3.5_medium.safetensors (no text encoders inside), '
      + 'load clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors from models/text_encoders '
      + 'with a TripleCLIPLoader and connect its CLIP instead. Apply Residuals encodes the prompt like CLIP '
      + 'Text Encode and records where its words sit in the CLIP-L/CLIP-G and T5 rows; chain Cones2 Load '
      + 'Residual nodes with SD3.5 residuals (family sd3) into "residuals" to add your own subjects. SD3.5 '
      + 'samples with real CFG (4.5 here) and a negative prompt. Layout Guidance biases the MMDiT\'s joint '
      + 'attention: image queries x each subject\'s text keys, inside its box up, outside down; Attention Maps '
      + 'shows where each word attended. More in the pack\'s docs/sd3.md.', [560, 220]);
  }
  out.sd3_two_subjects_layout = app.graph.serialize();
  app.graph.clear();
  return out;
}

(async () => {
  const url = process.argv[2] || 'http://127.0.0.1:8188';
  const outDir = process.argv[3] || path.join(__dirname, '..', '..', 'workflows');
  const { browser, page, errors } = await openComfy(url);
  const spec = {
    ckpt: CKPT,
    lora: 'cones2_tiny_sd15_lora.safetensors',
    controlnet: 'cones2_tiny_sd15_controlnet.safetensors',
    trainImage: 'cones2_example_dog.png',
    controlImage: 'cones2_example_control.png',
    layoutDogCat: LAYOUT_2('dog', 'cat'),
    layoutCatDog: LAYOUT_2('cat', 'dog'),
    layout3: LAYOUT_3,
    flux: FLUX,
    sd3Ckpt: 'sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors',  // what an SD3.5 user downloads (the note)
    fluxPrompt: 'a photo of a dog and a cat sitting on a red sofa',
    layoutFlux: LAYOUT_2('dog', 'cat').replace('"width": 64, "height": 64', '"width": 1024, "height": 1024'),
  };
  const before = errors.length;  // the frontend may log start-up errors of its own; only ours count
  const all = await page.evaluate(buildAll, spec);
  await browser.close();
  if (errors.length > before) throw new Error(`page errors while building: ${errors.slice(before).join('\n')}`);
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, wf] of Object.entries(all)) {
    const file = path.join(outDir, `${name}.json`);
    fs.writeFileSync(`${file}.tmp`, JSON.stringify(wf, null, 1) + '\n');
    fs.renameSync(`${file}.tmp`, file);
    process.stdout.write(`${name}\t${file}\t${wf.nodes.length} nodes, ${wf.links.length} links\n`);
  }
})().catch((e) => { console.error(e); process.exit(1); });
