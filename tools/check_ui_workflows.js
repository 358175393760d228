// Open each UI workflow of WORKFLOW_DIR in a running ComfyUI's real frontend, turn it into the prompt that Queue
// sends (app.graphToPrompt) and compare that with its API twin in WORKFLOW_DIR/api. Also fails a workflow on a dialog,
// a console error or a node the frontend enlarged (its saved size too small; that nodes do not overlap at their saved
// sizes is tests/test_workflows.py's test_ui_nodes_do_not_overlap).
// Needs Chromium (/usr/bin/chromium, Debian's `chromium`) and `npm install playwright-core`:
//   NODE_PATH=<folder>/node_modules node tools/check_ui_workflows.js http://127.0.0.1:8188/ workflows
// Another frontend from PyPI: unzip a comfyui-frontend-package wheel and start ComfyUI with
// --front-end-root <unzipped>/comfyui_frontend_package/static.
const { chromium } = require('playwright-core');
const fs = require('fs'), path = require('path');
(async () => {
  const [url, dir] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const errors = [];
  const noise = /404|Jobs API|Failed to fetch (jobs|queue)/; // a newer frontend polling endpoints this backend lacks
  page.on('console', m => { if (m.type() === 'error' && !noise.test(m.text())) errors.push(m.text()); });
  page.on('pageerror', e => errors.push('pageerror: ' + e.message));
  await page.goto(url);
  // app.rootGraph in newer frontends (1.42, 1.58), app.graph in older ones (1.27)
  await page.waitForFunction(() => window.app && (window.app.rootGraph || window.app.graph) && document.querySelector('canvas'),
    null, { timeout: 120000 });
  const version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ || '?');
  console.log('frontend', version);
  await page.waitForTimeout(3000);
  let failed = 0;
  for (const f of fs.readdirSync(dir).filter(f => f.endsWith('.json')).sort()) {
    const ui = JSON.parse(fs.readFileSync(path.join(dir, f)));
    const api = JSON.parse(fs.readFileSync(path.join(dir, 'api', f)));
    errors.length = 0;
    const res = await page.evaluate(async ([ui, name]) => {
      const app = window.app;
      await app.loadGraphData(ui, true, true, name);
      const p = await app.graphToPrompt();
      const sizes = {};
      for (const n of (app.rootGraph || app.graph)._nodes) sizes[n.id] = [n.size[0], n.size[1]];
      const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 300));
      return { output: p.output, sizes, dialogs };
    }, [ui, f]);
    const diffs = [];
    for (const id of new Set([...Object.keys(api), ...Object.keys(res.output)])) {
      const a = api[id], b = res.output[id];
      if (!a || !b) { diffs.push(`${id}: only in ${a ? 'api' : 'ui'}`); continue; }
      if (a.class_type !== b.class_type) diffs.push(`${id}: class ${a.class_type} vs ${b.class_type}`);
      for (const k of new Set([...Object.keys(a.inputs), ...Object.keys(b.inputs)]))
        if (JSON.stringify(a.inputs[k]) !== JSON.stringify(b.inputs[k]))
          diffs.push(`${id}.${k}: api ${JSON.stringify(a.inputs[k])} ui ${JSON.stringify(b.inputs[k])}`);
    }
    const resized = [], saved = Object.fromEntries(ui.nodes.map(n => [n.id, n.size]));
    for (const [id, [w, h]] of Object.entries(res.sizes))
      if (saved[id] && (w > saved[id][0] + 1 || h > saved[id][1] + 1)) resized.push(`${id}: ${saved[id]} -> ${[w, h]}`);
    const bad = diffs.length || resized.length || res.dialogs.length || errors.length;
    failed += bad ? 1 : 0;
    console.log(`${bad ? 'FAIL' : 'OK  '} ${f}: ${Object.keys(res.output).length} nodes, ${diffs.length} differences, ` +
      `${resized.length} enlarged, ${res.dialogs.length} dialogs, ${errors.length} console errors`);
    for (const l of [...diffs, ...resized.map(r => 'enlarged ' + r), ...res.dialogs, ...errors].slice(0, 12)) console.log('    ' + l);
  }
  await browser.close();
  process.exit(failed ? 1 : 0);
})().catch(e => { console.error(e); process.exit(2); });
