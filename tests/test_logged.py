"""What a run logs, read back from where it went: the values W&B was given (parsed from the offline
run's own .wandb file) equal metrics.jsonl; a behavioural suite during training writes suite lines, W&B
tables and the report's plot; suites/rust.yaml scores a model trained on a (generated) Rust corpus; the
progress bar draws on a terminal and only there; gradients are clipped at training.max_grad_norm.

Everything is real: the `foundry` CLI in subprocesses, a BPE tokenizer trained on the corpus, wandb in
offline mode with its directories in a temp dir, a pseudo-terminal for the bar, the real Learner."""
import copy, fcntl, hashlib, json, os, pty, random, re, select, statistics, struct, subprocess, termios, time, zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import FOUNDRY, REPO
from model_foundry.config import load_config
from model_foundry.loop import Callback, make_optimizer, make_scheduler
from model_foundry.run import RunDir, build_learner, plan_run
from model_foundry.suites import python_syntax_ok

RUST_SUITE = REPO/'suites'/'rust.yaml'
TINY_TEXT = REPO/'tests'/'data'/'tiny.txt'


# --- a small Rust corpus, generated: struct + impl, functions, a match, a Result, an async fn per file ---
TYPES = ['i32', 'i64', 'u32', 'u64', 'f64', 'usize']
NOUNS = ['count', 'total', 'size', 'index', 'width', 'height', 'score', 'limit', 'offset', 'value', 'depth', 'rate']
STRUCTS = ['Counter', 'Buffer', 'Parser', 'Config', 'Point', 'Matrix', 'Queue', 'Window', 'Cache', 'Token']


def rust_file(rng: random.Random) -> str:
    s, t, (a, b), op = rng.choice(STRUCTS), rng.choice(TYPES), rng.sample(NOUNS, 2), rng.choice(['+', '-', '*'])
    return ''.join([
        'use std::fs;\nuse std::io;\n\n',
        f'struct {s} {{\n    {a}: {t},\n    {b}: {t},\n}}\n\n',
        f'impl {s} {{\n    fn new({a}: {t}, {b}: {t}) -> Self {{\n        {s} {{ {a}, {b} }}\n    }}\n\n'
        f'    fn {a}(&self) -> {t} {{\n        self.{a}\n    }}\n}}\n\n',
        f'fn add_{a}(a: {t}, b: {t}) -> {t} {{\n    a {op} b\n}}\n\n',
        f'fn describe_{b}(n: Option<{t}>) -> &\'static str {{\n    match n {{\n        Some(_) => "some",\n'
        f'        None => "none",\n    }}\n}}\n\n',
        f'fn read_{a}(path: &str) -> Result<String, io::Error> {{\n    let text = fs::read_to_string(path)?;\n    Ok(text)\n}}\n\n',
        f'async fn fetch_{b}(n: {t}) -> {t} {{\n    n {op} 1 as {t}\n}}\n'])


def rust_corpus(root: Path, files: int = 40, seed: int = 0) -> Path:
    "`files` .rs files (about 23 KB in all) under `root`."
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files): (root/f'mod_{i:03d}.rs').write_text(rust_file(rng))
    return root


# --- reading W&B's offline run file: leveldb log format (32 KiB blocks of CRC'd chunks) of wandb_internal Record protos ---
def wandb_records(path: Path) -> list:
    "Every Record in a .wandb file, each chunk's checksum verified."
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack('<4sHB', data[:7])
    assert (ident, magic) == (b':W&B', 0xBEE1), (ident, magic)
    pos, buf, out, block = 7, b'', [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7: pos += block - pos % block; continue  # a block's zero trailer
        crc, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if (crc, n, kind) == (0, 0, 0): break  # zero padding at the end
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f'bad checksum at byte {pos} of {path}'
        buf, pos = buf + chunk, pos + 7 + n
        if kind in (1, 4):  # FULL or LAST: a whole record
            r = pb.Record(); r.ParseFromString(buf); out.append(r); buf = b''
    return out


def _items(items) -> dict:
    return {(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_wandb_run(path: Path) -> SimpleNamespace:
    "History rows, the final summary, the config, metric definitions and the exit record of a .wandb file."
    recs = wandb_records(path)
    of = lambda kind: [getattr(r, kind) for r in recs if r.WhichOneof('record_type') == kind]
    summary = {}
    for s in of('summary'):
        summary.update(_items(s.update))
        for i in s.remove: summary.pop(i.key or '/'.join(i.nested_key), None)
    (run,) = of('run')
    return SimpleNamespace(history=[_items(h.item) for h in of('history')], summary=summary, config=_items(run.config.update),
                           run_id=run.run_id, metrics=of('metric'), exit=of('exit'))


# --- one tracked run on the Rust corpus, shared by the W&B, suite and Rust-suite tests ---
RUST_RUN = """
experiment_name: rust-logged
random_seed: 3
data: {{source_corpus: {corpus}, include: ['*.rs'], batch_size: 8, max_sequence_length: 64}}
tokenizer: {{kind: bpe, vocab_size: 384}}
model: {{layers: 2, attention_heads: 2, embedding_size: 64}}
training: {{train_steps: 120, learning_rate: 1.0e-2, eval_interval: 60, eval_batches: 2, log_interval: 20,
           behavioral_suite: {suite}}}
logging: {{use_wandb: true, wandb_mode: offline, sample_prompts: ['fn main() {{']}}
"""
PY_CASE = dict(name='py-function', language='python', prompt='def area(w, h):\n', syntax=True)


def wandb_free_env(**extra) -> dict:
    "The environment without any W&B setting of the caller's (mode, run id, key, server), plus `extra`."
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    return dict(env, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'), **{k: str(v) for k, v in extra.items()})


def run_foundry(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(FOUNDRY), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope='module')
def rust_run(tmp_path_factory):
    "`foundry train` (output to pipes) on a generated Rust corpus, BPE, W&B offline, a Rust + Python suite at each evaluation."
    root = tmp_path_factory.mktemp('logged')
    corpus = rust_corpus(root/'corpus')
    suite = yaml.safe_load(RUST_SUITE.read_text())
    # the shipped Rust cases and one Python case, 48 new tokens each (the shipped 96 in `foundry eval`): half the generation time
    suite.update(name='rust-train', max_new_tokens=48, prompts=suite['prompts'] + [PY_CASE])
    (root/'suite.yaml').write_text(yaml.safe_dump(suite))
    (root/'c.yaml').write_text(RUST_RUN.format(corpus=corpus, suite=root/'suite.yaml'))
    home = root/'wandb-home'
    env = wandb_free_env(FOUNDRY_CACHE=root/'cache', **{k: home for k in ('WANDB_DIR', 'WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR')})
    run = root/'run'
    res = run_foundry('train', root/'c.yaml', '--run-dir', run, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((run/'state.json').read_text())
    (offline,) = (home/'wandb').glob(f"offline-run-*-{state['tracker_run_id']}")
    return SimpleNamespace(root=root, run=run, env=env, train=res, state=state, suite=suite, offline=offline,
                           records=[json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()],
                           wandb=read_wandb_run(offline/f"run-{state['tracker_run_id']}.wandb"))


@pytest.fixture(scope='module')
def rust_report(rust_run):
    "`foundry eval RUN --suite suites/rust.yaml` on the shared run."
    res = run_foundry('eval', rust_run.run, '--suite', RUST_SUITE, env=rust_run.env)
    assert res.returncode == 0, res.stderr[-3000:]
    return SimpleNamespace(out=res.stdout, dir=rust_run.run/'report', json=json.loads((rust_run.run/'report'/'report.json').read_text()))


def metric_rows(history: list[dict]) -> list[dict]:
    "The history rows of metrics.jsonl records (the others carry the samples table)."
    return [h for h in history if not any(k.startswith('samples/') for k in h)]


def table_rows(rr) -> dict:
    "{step: rows} of the samples tables W&B was given, read from the files the history points at (hashes checked)."
    out = {}
    for h in rr.wandb.history:
        if 'samples/path' not in h: continue
        f = rr.offline/'files'/h['samples/path']
        assert hashlib.sha256(f.read_bytes()).hexdigest() == h['samples/sha256'], f
        t = json.loads(f.read_text())
        assert t['columns'] == ['step', 'source', 'prompt', 'completion', 'passed'] and len(t['data']) == h['samples/nrows']
        out[h['trainer/step']] = [dict(zip(t['columns'], row)) for row in t['data']]
    return out


def expected_checks(case: dict, completion: str) -> dict:
    "The checks a suite case asks for, judged here on `completion` (independently of model_foundry.suites)."
    c = {f'must_match {p}': re.search(p, completion, re.M) is not None for p in case.get('must_match', [])}
    c.update({f'must_not_match {p}': re.search(p, completion, re.M) is None for p in case.get('must_not_match', [])})
    if case.get('min_length'): c['min_length'] = len(completion) >= case['min_length']
    if case.get('max_length') is not None: c['max_length'] = len(completion) <= case['max_length']
    return c


@pytest.mark.slow
def test_logged_wandb_values_equal_metrics_file(rust_run):
    recs, wb = rust_run.records, rust_run.wandb
    assert wb.run_id == rust_run.state['tracker_run_id'] and [e.exit_code for e in wb.exit] == [0]
    assert {'train', 'eval', 'suite'} <= {r['type'] for r in recs}
    # every metrics.jsonl record reached W&B as one history row, in order, numbers bit-equal, against trainer/step
    rows = metric_rows(wb.history)
    assert len(rows) == len(recs)
    for row, rec in zip(rows, recs):
        want = {f"{rec['type']}/{k}": v for k, v in rec.items() if k not in ('type', 'step') and isinstance(v, (int, float))}
        got = {k: v for k, v in row.items() if not k.startswith(('_', 'hardware/', 'trainer/'))}
        assert got == want and row['trainer/step'] == rec['step'], (rec, row)
        if rec['type'] == 'train': assert row['hardware/ram_gb'] > 0  # process RAM goes with each train record
    assert [h['_step'] for h in wb.history] == list(range(len(wb.history)))  # no row lost between the two
    # all metrics are plotted against trainer/step
    assert any(m.glob_name == '*' and m.step_metric == 'trainer/step' for m in wb.metrics)
    # the run's summary holds the last value of each metric
    for kind in ('train', 'eval', 'suite'):
        last = [r for r in recs if r['type'] == kind][-1]
        for k, v in last.items():
            if k not in ('type', 'step') and isinstance(v, (int, float)): assert wb.summary[f'{kind}/{k}'] == v, (kind, k)
    assert wb.summary['trainer/step'] == rust_run.state['step'] == 120
    # the config W&B holds is the resolved config.yaml of the run
    resolved = yaml.safe_load((rust_run.run/'config.yaml').read_text())
    assert {k: wb.config[k] for k in resolved} == resolved and resolved['training']['warmup_steps'] is not None


@pytest.mark.slow
def test_behavioral_suite_runs_during_training(rust_run, rust_report):
    recs, cases = rust_run.records, rust_run.suite['prompts']
    evals = [r['step'] for r in recs if r['type'] == 'eval']
    suites = [r for r in recs if r['type'] == 'suite']
    assert evals == [60, 120] and [s['step'] for s in suites] == evals
    for s in suites:  # the suite line follows its evaluation's line
        i = recs.index(s)
        assert recs[i - 1]['type'] == 'eval' and recs[i - 1]['step'] == s['step']
        assert s['suite'] == 'rust-train' and 0 <= s['pass_rate'] <= 1 and s['python_parse_rate'] in (0.0, 1.0)
    # each evaluation's completions went to W&B's samples table; the suite line is their summary
    tables = table_rows(rust_run)
    assert sorted(tables) == evals
    for s in suites:
        rows = tables[s['step']]
        assert [(r['source'], r['prompt'], r['passed']) for r in rows if r['source'] == 'sample'] == [('sample', 'fn main() {', None)]
        judged = [r for r in rows if r['source'] != 'sample']
        assert [r['source'] for r in judged] == [f"rust-train/{c['name']}" for c in cases]
        assert all(r['step'] == s['step'] for r in rows) and [r['prompt'] for r in judged] == [c['prompt'] for c in cases]
        for r, c in zip(judged, cases):
            checks = expected_checks(c, r['completion'])
            if c['language'] == 'python': checks['syntax'] = python_syntax_ok(c['prompt'], r['completion'])[0]
            assert r['passed'] == all(checks.values()), (c['name'], r['completion'])
        assert s['pass_rate'] == sum(r['passed'] for r in judged) / len(judged)
        assert s['length_mean'] == statistics.mean(len(r['completion']) for r in judged)
        (py,) = [r for r in judged if r['source'].endswith(PY_CASE['name'])]
        assert s['python_parse_rate'] == float(python_syntax_ok(PY_CASE['prompt'], py['completion'])[0])
    # the report plots the suite's pass rate over training (from the suite lines), and links the plot
    png = rust_report.dir/'suite.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 1000
    assert str(png) in rust_report.json['plots'] and '![suite](suite.png)' in (rust_report.dir/'report.md').read_text()


@pytest.mark.slow
def test_rust_suite_on_a_rust_corpus(rust_run, rust_report):
    cases = yaml.safe_load(RUST_SUITE.read_text())
    (s,) = rust_report.json['suites']
    assert s['suite'] == 'rust' and [r['name'] for r in s['results']] == [c['name'] for c in cases['prompts']]
    for r, c in zip(s['results'], cases['prompts']):
        assert set(r) == {'name', 'language', 'prompt', 'completion', 'length', 'tokens', 'checks', 'passed'}, r  # Rust: no parse fields
        assert (r['language'], r['prompt'], r['length']) == ('rust', c['prompt'], len(r['completion']))
        assert 0 < r['tokens'] <= c.get('max_new_tokens', cases['max_new_tokens'])
        assert r['checks'] == expected_checks(c, r['completion']) and r['passed'] == all(r['checks'].values()), c['name']
    passed = [r['passed'] for r in s['results']]
    sm, lengths = s['summary'], [r['length'] for r in s['results']]
    assert sm['prompts'] == 5 and sm['pass_rate'] == sum(passed) / 5 and 0 <= sm['pass_rate'] <= 1
    assert sm['pass_rate_by_language'] == {'rust': sm['pass_rate']} and sm['python_parse_rate'] is None
    assert (sm['length_min'], sm['length_max'], sm['length_median']) == (min(lengths), max(lengths), statistics.median(lengths))
    # 120 steps on this corpus learn some of its constructs (impl blocks, match arms): the suite tells them apart
    assert any(passed), [r['completion'] for r in s['results']]
    # the report scores final/ (the best checkpoint): greedy, its completions begin with the 48 tokens the suite run during
    # training generated from the same prompts at that step
    best = rust_run.state['best_step']
    during = {r['source'].split('/', 1)[1]: r['completion'] for r in table_rows(rust_run)[best] if r['source'] != 'sample'}
    assert any(during.values())
    for r in s['results']: assert r['completion'].startswith(during[r['name']]), (r['name'], during[r['name']], r['completion'])
    md = (rust_report.dir/'report.md').read_text()
    assert '## Suite rust' in md and all(f"| {c['name']} | rust | " in md for c in cases['prompts'])
    assert f"suite rust: pass rate {sm['pass_rate']:.0%} of 5" in rust_report.out


# --- the progress bar ---
BAR_RUN = """
experiment_name: bar
random_seed: 1
data: {{source_corpus: {corpus}, batch_size: 4, max_sequence_length: 16}}
tokenizer: {{kind: char}}
model: {{layers: 1, attention_heads: 2, embedding_size: 32}}
training: {{train_steps: 30, learning_rate: 3.0e-3, eval_interval: 10, eval_batches: 1, log_interval: 1}}
"""


def run_in_terminal(args, env, timeout=300) -> tuple[int, str]:
    "Run `args` with stdin, stdout and stderr on a pseudo-terminal 160 columns wide; (exit code, what it drew)."
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 160, 0, 0))
    p = subprocess.Popen([str(a) for a in args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try: data = os.read(master, 1 << 16)
                except OSError: break  # EIO: every writer of the terminal has gone
                if not data: break
                out.append(data)
        else: raise TimeoutError(f'{args} still drawing after {timeout} s')
    finally:
        if p.poll() is None: p.kill()
        p.wait(); os.close(master)
    return p.returncode, b''.join(out).decode('utf-8', 'replace')


VAL_LINE = re.compile(r'step (\d+): val_loss (\d+\.\d{4}) \(best (\d+\.\d{4}) at step (\d+)\)')


@pytest.mark.slow
def test_progress_bar_output(tmp_path, rust_run):
    cfg, run = tmp_path/'bar.yaml', tmp_path/'run'
    cfg.write_text(BAR_RUN.format(corpus=TINY_TEXT))
    code, shown = run_in_terminal([FOUNDRY, 'train', cfg, '--run-dir', run], wandb_free_env(FOUNDRY_CACHE=tmp_path/'cache'))
    assert code == 0, shown[-3000:]
    recs = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    # the bar counts steps up to the total, redrawn in place (carriage returns), and ends at 30/30
    draws = [d for d in re.split(r'[\r\n]+', shown) if re.match(r'train:\s+\d+%\|', d)]
    counts = [int(m.group(1)) for d in draws if (m := re.search(r'\| *(\d+)/30 \[', d))]
    assert len(counts) >= 2 and counts == sorted(counts) and counts[-1] == 30, draws
    assert re.search(r'\rtrain: +\d+%\|', shown)  # a bare carriage return (the terminal turns each newline into \r\n)
    # its postfix carries loss, learning rate and tokens/s: the last drawn are step 30's, as metrics.jsonl logged them
    last = [r for r in recs if r['type'] == 'train' and r['step'] == 30][0]
    assert re.search(rf"loss={last['loss']:.4f}, lr={last['lr']:.2e}, tok_s=[\d,]+\]", draws[-1]), draws[-1]
    # validation results are printed above the bar, one line per evaluation, the numbers metrics.jsonl has
    evals = [r for r in recs if r['type'] == 'eval']
    printed = [m.groups() for m in VAL_LINE.finditer(shown)]
    assert printed == [(str(r['step']), f"{r['val_loss']:.4f}", f"{r['best_val_loss']:.4f}", str(r['best_step'])) for r in evals]
    assert [r['step'] for r in evals] == [10, 20, 30]
    # on a pipe (the shared Rust run's output) no bar is drawn, but the validation lines are printed all the same
    piped = rust_run.train.stdout + rust_run.train.stderr
    assert '\r' not in piped and not re.search(r'\d+/\d+ \[|█|step/s', piped), piped[-2000:]
    assert [int(m.group(1)) for m in VAL_LINE.finditer(rust_run.train.stdout)] == [60, 120]


# --- clipping ---
CLIP_RUN = """
experiment_name: clip
random_seed: 4
data: {{source_corpus: {corpus}, batch_size: 4, max_sequence_length: 16}}
tokenizer: {{kind: char}}
model: {{layers: 2, attention_heads: 2, embedding_size: 32}}
training: {{train_steps: 4, learning_rate: 0.5, warmup_steps: 0, max_grad_norm: {clip}, eval_interval: 100, eval_batches: 1,
           log_interval: 1, checkpoint_interval: 100}}
"""


def flat(ts) -> torch.Tensor: return torch.cat([t.detach().double().flatten() for t in ts])


class ClipWitness(Callback):
    """Records each step's raw gradients (after backward, before clipping) and steps a reference copy of the model with
    AdamW on those gradients clipped here, independently of the loop, to compare with what the loop applied."""
    def __init__(self, ref_model, training, max_norm):
        self.ref, self.max_norm, self.raw_norms, self.seen_norms = ref_model, max_norm, [], []
        self.ref_opt = make_optimizer(ref_model, training)
        self.ref_sched = make_scheduler(self.ref_opt, training)
    def before_fit(self):  # what the optimizer itself is handed, each step
        self.learn.opt.register_step_pre_hook(lambda opt, args, kw: self.seen_norms.append(
            flat(p.grad for g in opt.param_groups for p in g['params'] if p.grad is not None).norm().item()))
    def after_backward(self):
        grads = [p.grad for p in self.learn.model.parameters()]
        norm = flat(grads).norm().item()
        self.raw_norms.append(norm)
        coef = min(1.0, self.max_norm / (norm + 1e-6))
        for r, g in zip(self.ref.parameters(), grads): r.grad = g.detach().clone() * coef
        self.ref_opt.step(); self.ref_sched.step(); self.ref_opt.zero_grad(set_to_none=True)


def planned(tmp_path, clip):
    "(run dir, resolved config, prepared data) of CLIP_RUN with training.max_grad_norm `clip`, as `train` plans them."
    cfg = tmp_path/f'clip-{clip}.yaml'
    cfg.write_text(CLIP_RUN.format(corpus=TINY_TEXT, clip=clip))
    run = RunDir(tmp_path/f'run-{clip}')
    prepared, resolved, _ = plan_run(load_config(cfg), run, progress=False)
    return run, resolved, prepared


def test_gradients_clipped_at_max_grad_norm(tmp_path, cache_dir):
    max_norm = 0.01
    run, cfg, prepared = planned(tmp_path, max_norm)
    learn = build_learner(cfg, prepared, run, progress=False)
    assert learn.max_grad_norm == max_norm  # training.max_grad_norm reaches the Learner
    witness = learn.add_cb(ClipWitness(copy.deepcopy(learn.model), cfg.training, max_norm))
    learn.fit()
    logged = [r['grad_norm'] for r in map(json.loads, run.metrics.read_text().splitlines()) if r['type'] == 'train']
    assert len(logged) == len(witness.raw_norms) == len(witness.seen_norms) == 4
    # the logged grad_norm is the norm before clipping, and clipping bit: every step's norm was far above the limit
    assert logged == pytest.approx(witness.raw_norms, rel=1e-5) and min(logged) > 10 * max_norm
    # what the optimizer was handed was clipped to max_grad_norm (scaled down to it, not zeroed)
    assert all(max_norm * (1 - 1e-4) <= n <= max_norm * (1 + 1e-5) for n in witness.seen_norms), witness.seen_norms
    # and the update it applied is AdamW on the clipped gradients: the reference copy, clipped here, ends with the same weights
    got, ref = flat(learn.model.parameters()), flat(witness.ref.parameters())
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (got - ref).abs().max()
    # an unclipped copy (max_grad_norm null) takes other steps from the same start: the clip changed the training
    run0, cfg0, _ = planned(tmp_path, 'null')
    free = build_learner(cfg0, prepared, run0, progress=False)
    assert free.max_grad_norm is None
    free_witness = free.add_cb(ClipWitness(copy.deepcopy(free.model), cfg0.training, float('inf')))
    free.fit()
    assert free_witness.seen_norms == pytest.approx(free_witness.raw_norms, rel=1e-6)  # nothing clipped
    assert free_witness.raw_norms[0] == pytest.approx(witness.raw_norms[0], rel=1e-6)  # the same first gradient
    assert (flat(free.model.parameters()) - got).abs().max() > 1e-3
