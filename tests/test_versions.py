"""Files outlive the code that wrote them: old configs migrate with a warning, removed keys are errors, files from a newer
model_foundry are refused on one line (and left as they are), and the run directories committed under
tests/fixtures/golden/ by earlier versions (tools/make_golden_fixture.py) still resume, evaluate and generate."""
import json, shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO, assert_resumed_as_one_go, copy_fixture_run, foundry, foundry_here
from model_foundry.checkpointing import write_manifest

CORPUS = REPO/'tests'/'data'/'tiny.txt'
GOLDEN = sorted((REPO/'tests'/'fixtures'/'golden').iterdir())
V1 = """experiment_name: old
random_seed: 0
data: {{training_corpus: {corpus}, batch_size: 8, max_sequence_length: 16}}
tokenizer: {{kind: char}}
model: {{layers: 1, embedding_size: 32, attention_heads: 2}}
training: {{train_steps: 4, eval_interval: 2, eval_batches: 1, log_interval: 2, output_dir: {out}{extra}}}
"""


def files(root) -> dict:
    "Every file under `root` with its bytes: what a refusal must leave as it found it."
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


def one_line_refusal(res, *words):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    last = res.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in res.stderr and all(w in last for w in words), res.stderr[-2000:]


@pytest.mark.slow
def test_config_with_legacy_keys_migrates_with_warning(tmp_path, cache_dir):
    cfg = tmp_path/'old.yaml'
    cfg.write_text(V1.format(corpus=CORPUS, out=tmp_path/'elsewhere', extra=''))
    res = foundry_here('train', cfg, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for old, new in (('data.training_corpus', 'data.source_corpus'), ('training.output_dir', 'logging.dir')):
        assert f'config key {old} is deprecated since schema_version 2: read as {new}' in res.stderr, res.stderr[-3000:]
    run = tmp_path/'elsewhere'/'old'  # training.output_dir, read as logging.dir, placed the run: not the default runs/
    assert json.loads((run/'state.json').read_text())['status'] == 'completed' and not (tmp_path/'runs').exists()
    saved = yaml.safe_load((run/'config.yaml').read_text())  # the run's config is written at the current version
    assert saved['schema_version'] == 2 and saved['data']['source_corpus'] == str(CORPUS) and 'training_corpus' not in saved['data']
    assert saved['logging']['dir'] == str(tmp_path/'elsewhere') and 'output_dir' not in saved['training']
    again = foundry_here('train', run/'config.yaml', '--run-dir', run)  # the saved config reads without a warning, and is finished
    assert again.returncode == 0 and 'deprecated' not in again.stderr, again.stderr[-2000:]


@pytest.mark.slow
def test_removed_config_key_is_an_error_not_a_default(tmp_path, cache_dir):
    cfg = tmp_path/'old.yaml'
    cfg.write_text(V1.format(corpus=CORPUS, out=tmp_path/'out', extra=', eval_iters: 50'))
    res = foundry_here('train', cfg, cwd=tmp_path)
    one_line_refusal(res, 'training.eval_iters was removed in schema_version 2', 'set training.eval_batches')
    assert not (tmp_path/'out').exists()  # nothing written
    cfg.write_text(V1.format(corpus=CORPUS, out=tmp_path/'out', extra=', eval_every: 50').replace('training_corpus', 'source_corpus'))
    one_line_refusal(foundry_here('train', cfg, cwd=tmp_path), 'training.eval_every', 'unknown key')  # never known: no default either


@pytest.mark.slow
def test_newer_format_version_is_refused(tmp_path, cache_dir):
    newer = tmp_path/'newer.yaml'
    newer.write_text(f'schema_version: 3\ndata: {{source_corpus: {CORPUS}}}\n')
    one_line_refusal(foundry_here('train', newer, cwd=tmp_path), 'newer.yaml: schema_version 3 is newer than this model_foundry reads (2)')
    assert not (tmp_path/'runs').exists()

    def refused(edit, *words):
        "A copy of the stopped golden run, one file edited as a newer model_foundry would write it: `train` refuses, changing nothing."
        run = copy_fixture_run(GOLDEN[-1]/'stopped', tmp_path/edit.__name__)
        edit(run)
        before = files(run)
        one_line_refusal(foundry_here('train', run/'config.yaml', '--run-dir', run), 'is newer than this model_foundry reads', *words)
        assert files(run) == before  # no checkpoint quarantined, no state rewritten, no metrics truncated

    def state(run):
        st = json.loads((run/'state.json').read_text()); st['format_version'] = 9
        (run/'state.json').write_text(json.dumps(st))

    def manifest(run):
        m = run/'checkpoints'/'step-00000010'/'manifest.json'
        m.write_text(json.dumps(dict(json.loads(m.read_text()), format_version=9)))

    def trainer_state(run):  # a well-formed checkpoint (its manifest agrees) whose trainer state is of a newer format
        ck = run/'checkpoints'/'step-00000010'
        (ck/'trainer_state.json').write_text(json.dumps(dict(json.loads((ck/'trainer_state.json').read_text()), format_version=9)))
        write_manifest(ck)

    refused(state, 'state.json: format_version 9')
    refused(manifest, 'manifest.json: format_version 9')
    refused(trainer_state, 'trainer_state.json: format_version 9')


def same_weights(a, b) -> bool:
    sa, sb = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize('golden', GOLDEN, ids=[g.name for g in GOLDEN])
def test_committed_fixture_run_resumes_evaluates_and_generates(tmp_path, cache_dir, golden, monkeypatch):
    made = json.loads((golden/'FIXTURE.json').read_text())
    monkeypatch.setenv('OMP_NUM_THREADS', str(made['threads']))  # the fixture's thread count: the same float sums, so bit for bit
    # resume the run the fixture's version stopped after step 10 of 20
    run = copy_fixture_run(golden/'stopped', tmp_path)
    res = foundry_here('train', run/'config.yaml', '--run-dir', run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'from step-00000010: continuing at step 11' in res.stderr and json.loads((run/'state.json').read_text())['status'] == 'completed'
    # bit for bit what today's code trains in one go from the same config (where this CPU rounds as the fixture's did)
    ref = tmp_path/'ref'
    assert foundry_here('train', run/'config.yaml', '--run-dir', ref).returncode == 0
    print(assert_resumed_as_one_go(run/'final', ref/'final', golden/'stopped'/'checkpoints'/'step-00000010', ref/'checkpoints'/'step-00000010'))
    # and what the fixture's version trained in one go, as closely as two versions' arithmetic allows
    losses = lambda r: {x['step']: x['loss'] for x in map(json.loads, (r/'metrics.jsonl').read_text().splitlines()) if x.get('type') == 'train'}
    theirs, ours = losses(golden/'completed'), losses(run)
    assert set(theirs) == set(ours) and max(abs(theirs[s] - ours[s]) for s in theirs) < 1e-4, (made, theirs, ours)

    # evaluate and generate from the finished run the fixture's version left, and from its pytorch_model.bin export
    done = copy_fixture_run(golden/'completed', tmp_path)
    ev = foundry_here('eval', done)
    assert ev.returncode == 0, ev.stderr[-3000:]
    val = json.loads((done/'report'/'report.json').read_text())['validation']  # what the fixture's version's eval said
    assert val['tokens'] == made['validation']['tokens'] and abs(val['val_loss'] - made['validation']['val_loss']) < 1e-5, (val, made)
    texts = [foundry_here('generate', src, '--prompt', made['prompt'], '--max-new-tokens', '12', '--temperature', '0')
             for src in (done, done/'final', done/'final-bin')]
    assert all(t.returncode == 0 for t in texts), [t.stderr[-1000:] for t in texts]
    assert {t.stdout for t in texts} == {made['prompt'] + made['greedy'] + '\n'}, ([t.stdout for t in texts], made['greedy'])
    assert (done/'final-bin'/'pytorch_model.bin').is_file() and not list((done/'final-bin').glob('*.safetensors'))
    assert same_weights(done/'final', done/'final-bin')  # the plain Auto class reads the .bin export as the safetensors one
