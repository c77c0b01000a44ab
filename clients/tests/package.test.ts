// The package as an app installs it: lib/ is what the sources build to,
// its copy of the browser client is the one the server serves, and the
// server-side entry has the browser entry's API without importing `vue`.
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'

const clientsDir = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const lib = join(clientsDir, 'lib')

test('lib/ is exactly what src/ and assets/client.js build to', () => {
  const fresh = mkdtempSync(join(tmpdir(), 'windflow-lib-'))
  try {
    execFileSync(process.execPath, [join(clientsDir, 'scripts', 'build.mjs'), fresh], { stdio: 'pipe' })
    const built = readdirSync(fresh).sort()
    assert.deepEqual(readdirSync(lib).sort(), built, 'the files of lib/: run `npm run build --prefix clients` and commit lib/')
    for (const file of built) {
      const same = readFileSync(join(lib, file)).equals(readFileSync(join(fresh, file)))
      assert.ok(same, `lib/${file} is stale: run \`npm run build --prefix clients\` and commit lib/`)
    }
  } finally {
    rmSync(fresh, { recursive: true, force: true })
  }
})

test('the package ships the browser client the server serves, byte for byte', () => {
  for (const file of ['client.js', 'client.d.ts']) {
    assert.ok(readFileSync(join(lib, file)).equals(readFileSync(join(clientsDir, '..', 'assets', file))), file)
  }
})

test('no declaration the package ships names `vue`', () => {
  // A linked package resolves `vue` from the checkout, not from the app.
  for (const file of readdirSync(lib).filter((name) => name.endsWith('.d.ts'))) {
    assert.doesNotMatch(readFileSync(join(lib, file), 'utf8'), /from ['"]vue['"]|import\(['"]vue['"]\)/, file)
  }
})

test('the server-side entry exports what the browser entry does, and imports nothing', async () => {
  const browser = await import('windflow-notify-clients/browser')
  const server = await import(join(lib, 'server.js'))
  assert.deepEqual(Object.keys(server).sort(), Object.keys(browser).sort())
  assert.doesNotMatch(readFileSync(join(lib, 'server.js'), 'utf8'), /from ['"](?!\.\/)/, 'only its own modules')
  for (const name of ['server.js', 'deployment.js', 'client.js']) {
    assert.doesNotMatch(readFileSync(join(lib, name), 'utf8'), /from ['"]vue['"]/, name)
  }
})

test('Node resolves the package to the server-side entry, browsers to the browser one', async () => {
  const manifest = JSON.parse(readFileSync(join(clientsDir, 'package.json'), 'utf8'))
  const root = manifest.exports['.']
  assert.deepEqual(Object.keys(root), ['types', 'browser', 'node', 'default'], 'browser is matched before node')
  assert.equal(fileURLToPath(import.meta.resolve('windflow-notify-clients')), join(lib, 'server.js'))
})
