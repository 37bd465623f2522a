// Build the web page into service/samserve/web_static/ (git-ignored; the gateway serves it at /):
// index.html, style.css, app.js (src/*.js + onnxruntime-web, bundled by esbuild), onnxruntime-web's .wasm,
// and the demo scene. Nothing is fetched from a CDN at run time. `npm ci && npm run build` (or `make web`).
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "service", "samserve", "web_static");
const require = createRequire(import.meta.url);
// onnxruntime-web's wasm build and its JS glue as a module of its own: the page runs the decoder on several threads
// where it is cross-origin isolated (the gateway sends COOP/COEP), and each worker thread loads that module.
const wasm = require.resolve("onnxruntime-web/ort-wasm-simd-threaded.wasm");
const glue = require.resolve("onnxruntime-web/ort-wasm-simd-threaded.mjs");

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "app.js")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["chrome110", "firefox115", "safari16"],
  minify: true,
  sourcemap: true,
  legalComments: "linked",
  outfile: join(out, "app.js"),
  logLevel: "warning",
});
for (const name of ["index.html", "style.css", "demo.png"]) copyFileSync(join(here, name), join(out, name));
copyFileSync(wasm, join(out, "ort-wasm-simd-threaded.wasm"));
copyFileSync(glue, join(out, "ort-wasm-simd-threaded.mjs"));
console.log(`web page built into ${out}`);
