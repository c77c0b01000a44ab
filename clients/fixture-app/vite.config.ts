import vue from '@vitejs/plugin-vue'
import { defineConfig } from 'vite'

// The recipe of docs/client.md: the page's default `/ws` (and `/events`)
// go to windflow-notify, in `vite` (dev) and `vite preview` alike.
const target = process.env.WINDFLOW_URL ?? 'http://127.0.0.1:8000'
const proxy = {
  '/ws': { target, ws: true },
  '/events': { target },
}

export default defineConfig({
  plugins: [vue()],
  server: { proxy },
  preview: { proxy },
})
