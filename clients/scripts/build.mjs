// Builds the package as shipped: src/ -> lib/ with tsc, and lib/client.js
// and lib/client.d.ts copied byte for byte from ../assets/ (the browser
// client the server serves at /client.js). lib/ is committed, so a
// checkout installs with no build step; tests/package.test.ts fails when
// lib/ is not what this script makes of the sources.
//
//   node scripts/build.mjs [OUT_DIR]   (default lib)
import { execFileSync } from 'node:child_process'
import { copyFileSync, rmSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const out = resolve(root, process.argv[2] ?? 'lib')
const tsc = join(root, 'node_modules', '.bin', 'tsc')

rmSync(out, { recursive: true, force: true })
execFileSync(tsc, ['-p', join(root, 'tsconfig.lib.json'), '--outDir', out], { stdio: 'inherit' })
for (const file of ['client.js', 'client.d.ts']) copyFileSync(join(root, '..', 'assets', file), join(out, file))
