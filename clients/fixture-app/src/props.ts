import type { InitialState } from 'windflow-notify-clients'

/** What the page shows: `?ids=A,B&pinned=C&initial=<JSON>` (the browser tests set them). */
export interface PageProps {
  ids: string[]
  pinned?: string
  initial?: InitialState
}

export function pageProps(search: string): PageProps {
  const params = new URLSearchParams(search)
  const initial = params.get('initial')
  return {
    ids: (params.get('ids') ?? '').split(',').filter(Boolean),
    pinned: params.get('pinned') ?? undefined,
    initial: initial ? (JSON.parse(initial) as InitialState) : undefined,
  }
}
