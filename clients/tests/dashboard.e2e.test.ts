// The dashboard at `/` in headless Chromium, against `windflow-notify demo`
// on a fresh database: rows written with SQL must appear on the page, and
// the page must survive a server restart without a reload. Saves a
// screenshot (SCREENSHOT, default ../target/dashboard.png).
import assert from 'node:assert/strict'
import { mkdirSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { randomUUID } from 'node:crypto'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'
import { launchChromium, noChromium } from '../support/browser.js'
import { connectWriter, createDatabase, startServer, token, WAIT, type Server } from '../support/server.js'

const clientsDir = resolve(dirname(fileURLToPath(import.meta.url)), '../..')
const SCREENSHOT = resolve(clientsDir, process.env.SCREENSHOT ?? '../target/dashboard.png')

test('the dashboard shows live status, progress and logs, and survives a restart', { skip: noChromium, timeout: 120_000 }, async () => {
  const database = await createDatabase()
  let demo: Server | null = null
  let restarted: Server | null = null
  const browser = await launchChromium()
  const { context } = browser
  try {
    demo = await startServer(database, { command: 'demo' })
    const url = (await demo.line(/^\s+http:\/\/\S+\/\?token=/)).trim()
    const demoToken = new URL(url).searchParams.get('token')!
    const user = JSON.parse(Buffer.from(demoToken.split('.')[1], 'base64url').toString()).sub as string
    const sql = await connectWriter(database)

    const page = await context.newPage()
    const problems: string[] = []
    page.on('pageerror', (error) => problems.push(String(error)))
    await page.goto(url)
    await page.locator('#connection[data-state="open"]').waitFor({ timeout: WAIT })
    assert.ok(!page.url().includes('token='), 'the token leaves the address bar')
    // Marks this document: after the restart it must still be the same page.
    await page.evaluate(() => ((window as unknown as { marker: number }).marker = 42))

    // The demo's simulated deployments: yours and your teammate's, never
    // the other organization's. billing-worker's first life fails.
    const card = (name: string) => page.locator('.deployment', { has: page.locator('.name', { hasText: new RegExp(`^${name}$`) }) })
    await card('docs-site').waitFor({ timeout: WAIT })
    await card('billing-worker').locator('.status[data-status="failed"]').waitFor({ timeout: 45_000 })
    assert.equal(await card('other-org-db').count(), 0, 'another organization’s deployment is filtered out')
    // Each card says why you see it, and a short id tells same-named deployments apart.
    assert.equal(await card('api-gateway').locator('.owner').textContent(), 'yours')
    assert.equal(await card('docs-site').locator('.owner').textContent(), 'your organization')
    const gatewayId = await card('api-gateway').getAttribute('data-deployment-id')
    assert.equal(await card('api-gateway').locator('.short-id').textContent(), gatewayId!.slice(0, 8))
    const scrollbar = await page.locator('#logs').evaluate((pane) => getComputedStyle(pane).scrollbarColor)
    assert.notEqual(scrollbar, 'auto', 'the log pane has a dark scrollbar, not the light default')
    await card('billing-worker').click()
    await page.locator('#logs', { hasText: 'Health check failed' }).waitFor({ timeout: WAIT })
    mkdirSync(dirname(SCREENSHOT), { recursive: true })
    await page.screenshot({ path: SCREENSHOT })

    // A deployment written by hand, as any backend writer would.
    const { rows } = await sql.query(
      "INSERT INTO deployments (user_id, name) VALUES ($1, 'e2e-check') RETURNING id",
      [user],
    )
    const id: string = rows[0].id
    const mine = page.locator(`[data-deployment-id="${id}"]`)
    await mine.locator('.status[data-status="pending"]').waitFor({ timeout: WAIT })
    await sql.query(
      "UPDATE deployments SET status = 'deploying', progress = 40, current_step = 'Pulling images', total_steps = 5 WHERE id = $1",
      [id],
    )
    await mine.locator('.status[data-status="deploying"]').waitFor({ timeout: WAIT })
    await mine.locator('.progress-bar[data-progress="40"]').waitFor({ timeout: WAIT })
    await mine.locator('.current-step', { hasText: 'Pulling images' }).waitFor({ timeout: WAIT })
    await mine.click()
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, '[INFO] hello from SQL'])
    await page.locator('#logs', { hasText: '[INFO] hello from SQL' }).waitFor({ timeout: WAIT })

    // A superuser sees every organization's deployments, each labelled as such.
    const admin = await context.newPage()
    admin.on('pageerror', (error) => problems.push(String(error)))
    await admin.goto(`${new URL(url).origin}/?token=${token(randomUUID(), { superuser: true })}`)
    const adminCard = (name: string) => admin.locator('.deployment', { has: admin.locator('.name', { hasText: new RegExp(`^${name}$`) }) })
    await adminCard('other-org-db').waitFor({ timeout: WAIT })
    assert.equal(await adminCard('other-org-db').locator('.owner').textContent(), 'visible as superuser')
    assert.equal(await adminCard('api-gateway').locator('.owner').textContent(), 'visible as superuser')
    await admin.close()

    // Restart: the page reconnects by itself and catches up.
    const port = demo.port
    await demo.stop()
    await page.locator('#connection[data-state="reconnecting"]').waitFor({ timeout: WAIT })
    await sql.query('INSERT INTO deployment_logs (deployment_id, message) VALUES ($1, $2)', [id, '[INFO] written while down'])
    await sql.query("UPDATE deployments SET status = 'running', progress = 100, current_step = 'Running' WHERE id = $1", [id])
    restarted = await startServer(database, { port })
    await page.locator('#connection[data-state="open"]').waitFor({ timeout: WAIT })
    await page.locator('#logs', { hasText: '[INFO] written while down' }).waitFor({ timeout: WAIT })
    await mine.locator('.status[data-status="running"]').waitFor({ timeout: WAIT })
    await mine.locator('.progress-bar[data-progress="100"]').waitFor({ timeout: WAIT })
    assert.equal(await page.evaluate(() => (window as unknown as { marker?: number }).marker), 42, 'no reload')
    const lines = await page.locator('#logs > div', { hasText: '[INFO] written while down' }).count()
    assert.equal(lines, 1, 'the missed line appears exactly once')
    await sql.end()
    assert.deepEqual(problems, [], 'no script errors on the page')
  } finally {
    await browser.close()
    await restarted?.stop()
    await demo?.stop()
    await database.drop()
  }
})
