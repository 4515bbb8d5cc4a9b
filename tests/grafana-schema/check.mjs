// Type-checks Grafana dashboard JSON files against @grafana/schema:
//   node check.mjs DASHBOARD_DIR
// Each dashboard must be a `Dashboard`; each panel's `options` (and
// `fieldConfig.defaults.custom`) must be the Options (FieldConfig) of its
// panel plugin's published schema. Generates gen/*.ts and runs tsc on them;
// exits with tsc's status (0: every dashboard conforms).
import { readdirSync, readFileSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join, dirname, basename } from 'node:path';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const src = process.argv[2];
if (!src) {
  console.error('usage: node check.mjs DASHBOARD_DIR');
  process.exit(2);
}
const PANELS = {
  timeseries: { mod: 'TimeSeries', options: 'Options', custom: 'FieldConfig' },
  stat: { mod: 'Stat', options: 'Options', custom: null },
  table: { mod: 'Table', options: 'Options', custom: 'FieldConfig' },
};
const gen = join(here, 'gen');
rmSync(gen, { recursive: true, force: true });
mkdirSync(gen);
const files = readdirSync(src).filter((f) => f.endsWith('.json'));
if (files.length === 0) {
  console.error(`no dashboards in ${src}`);
  process.exit(2);
}
for (const f of files) {
  const d = JSON.parse(readFileSync(join(src, f), 'utf8'));
  const lit = (v) => JSON.stringify(v, null, 2);
  let ts = `import type { Dashboard } from '@grafana/schema';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type { Wire } from '../wire';

export const dashboard: Wire<Dashboard> = ${lit(d)};
`;
  for (const p of d.panels ?? []) {
    const kind = PANELS[p.type];
    if (!kind) {
      ts += `\n// panel ${p.id}: type ${JSON.stringify(p.type)} has no published options schema here\nexport const panel_${p.id}_unknown_type: never = ${lit(p.type)};\n`;
      continue;
    }
    ts += `\nexport const panel_${p.id}_options: Wire<${kind.mod}.${kind.options}> = ${lit(p.options ?? {})};\n`;
    if (kind.custom) {
      ts += `export const panel_${p.id}_custom: Wire<${kind.mod}.${kind.custom}> = ${lit(p.fieldConfig?.defaults?.custom ?? {})};\n`;
    }
  }
  writeFileSync(join(gen, basename(f, '.json').replace(/[^A-Za-z0-9_-]/g, '_') + '.ts'), ts);
}
const tsc = join(here, 'node_modules', 'typescript', 'bin', 'tsc');
const r = spawnSync(process.execPath, [tsc, '-p', join(here, 'tsconfig.json')], { stdio: 'inherit' });
if (r.status === 0) {
  console.log(`${files.length} dashboard(s) conform to @grafana/schema`);
}
process.exit(r.status ?? 1);
