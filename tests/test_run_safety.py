"""What a run directory promises when things go wrong, with real processes, real files and a real
small filesystem: a checkpoint loads on its own; nothing that fails verification is deleted; checkpoints
written by an earlier version of this project, or on a GPU, resume here; one trainer per run directory;
a full disk costs the step being saved and nothing else."""
import json, os, signal, subprocess, shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, assert_resumed_as_one_go, copy_fixture_run, foundry, start_train, wait_until, foundry_here
from model_foundry.checkpointing import list_checkpoints, load_checkpoint, verify_checkpoint
from model_foundry.config import load_config
from model_foundry.fixtures import StopAfter
from model_foundry.model import build_model
from model_foundry.run import RunInterrupted, train

CORPUS = REPO/'tests'/'data'/'tiny.txt'
FIXTURES = REPO/'tests'/'fixtures'
TINY = """experiment_name: {name}
random_seed: 0
data: {{source_corpus: {corpus}, batch_size: 8, max_sequence_length: 16}}
tokenizer: {{kind: char}}
model: {{architecture: {arch}, layers: 1, embedding_size: 32, attention_heads: 2}}
training: {{train_steps: {steps}, learning_rate: 3.0e-3, warmup_steps: 5, eval_interval: {every}, eval_batches: 2,
           checkpoint_interval: {every}, log_interval: 5, precision: {precision}}}
"""


def write_config(tmp_path, name='tiny', steps=40, every=10, arch='gpt2', precision='auto') -> Path:
    p = tmp_path/f'{name}.yaml'
    p.write_text(TINY.format(name=name, corpus=CORPUS, steps=steps, every=every, arch=arch, precision=precision))
    return p


def state(run) -> dict: return json.loads((Path(run)/'state.json').read_text())


def same_weights(a, b) -> bool:
    "Two model directories (final/ or a checkpoint) hold the same tensors, as the Auto classes load them."
    sa, sb = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_checkpoint_dir_loads_alone_with_auto_classes(tmp_path, cache_dir, arch):
    run = tmp_path/'run'
    assert train(load_config(write_config(tmp_path, steps=20, arch=arch)), run, progress=False)['status'] == 'completed'
    tok = AutoTokenizer.from_pretrained(run/'tokenizer')
    cfg = load_config(run/'config.yaml')
    for ck in list_checkpoints(run/'checkpoints'):
        alone = tmp_path/'elsewhere'/ck.name  # nothing but the step directory itself
        shutil.copytree(ck, alone)
        model = AutoModelForCausalLM.from_pretrained(alone).eval()
        ours = build_model(cfg.model, cfg.tokenizer.vocab_size, cfg.data.max_sequence_length, tok.eos_token_id)
        load_checkpoint(ck, ours, restore_rng_state=False)
        assert model.config.model_type == arch
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ours.eval().state_dict().values()))
        ids = tok('the cat', return_tensors='pt')['input_ids']
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        assert out.shape[1] == ids.shape[1] + 8
    assert same_weights(run/'final', run/'checkpoints'/f"step-{state(run)['best_step']:08d}")


@pytest.mark.slow
def test_unverifiable_checkpoint_is_quarantined_not_deleted(tmp_path, cache_dir):
    cfg, run = write_config(tmp_path), tmp_path/'run'
    with pytest.raises(RunInterrupted): train(load_config(cfg), run, progress=False, callbacks=[StopAfter(30)])
    ck = run/'checkpoints'/'step-00000030'
    with open(ck/'model.safetensors', 'r+b') as f: f.seek(-32, os.SEEK_END); f.write(os.urandom(32))  # a failing disk
    damaged = {p.name: p.read_bytes() for p in ck.iterdir()}
    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'step-00000030' in res.stderr and 'quarantine' in res.stderr and 'does not match its sha256' in res.stderr
    assert state(run)['resumed_from'] == 'step-00000020' and state(run)['status'] == 'completed'
    q = run/'checkpoints'/'quarantine'
    assert {p.name: p.read_bytes() for p in (q/'step-00000030').iterdir()} == damaged  # every byte kept, as it was
    assert 'model.safetensors does not match its sha256' in (q/'step-00000030.reason.txt').read_text()
    assert verify_checkpoint(run/'checkpoints'/'step-00000030') is None  # written again by the resumed run


@pytest.mark.slow
def test_checkpoint_without_manifest_from_earlier_version_is_upgraded_and_resumed(tmp_path, cache_dir):
    # tests/fixtures/legacy_run was written by this project at commit 5f403bd (before checkpoints had a manifest,
    # a config.json or a format_version), stopped after its step-10 checkpoint as a crash would leave it
    run = copy_fixture_run(FIXTURES/'legacy_run', tmp_path)
    ck = run/'checkpoints'/'step-00000010'
    assert not (ck/'manifest.json').exists() and 'format_version' not in json.loads((ck/'trainer_state.json').read_text())
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    res = foundry_here('train', run/'config.yaml', '--run-dir', run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'written by an earlier version' in res.stderr and 'from step-00000010: continuing at step 11' in res.stderr
    assert verify_checkpoint(ck) is None and set(json.loads((ck/'manifest.json').read_text())['files']) == set(before) - {'COMPLETE'}
    assert all((ck/n).read_bytes() == b for n, b in before.items())  # upgraded by adding a manifest; nothing else touched
    assert not (run/'checkpoints'/'quarantine').exists()
    # the same run trained from scratch by today's code ends with the same weights (bit for bit where this CPU rounds as
    # the fixture's did)
    ref = tmp_path/'ref'
    assert foundry_here('train', run/'config.yaml', '--run-dir', ref).returncode == 0
    print(assert_resumed_as_one_go(run/'checkpoints'/'step-00000020', ref/'checkpoints'/'step-00000020', ck, ref/'checkpoints'/'step-00000010'))


@pytest.mark.slow
def test_gpu_saved_optimizer_state_resumes_on_cpu(tmp_path, cache_dir):
    # tests/fixtures/gpu_run: stopped at step 10; its optimizer state carries CUDA device tags (see
    # tools/make_gpu_checkpoint_fixture.py and the fixture's environment.json for how it was made)
    run = copy_fixture_run(FIXTURES/'gpu_run', tmp_path)
    ck = run/'checkpoints'/'step-00000010'
    if not torch.cuda.is_available():  # what every CPU-only loader without map_location meets
        with pytest.raises(RuntimeError, match='CUDA'): torch.load(ck/'optimizer.pt', weights_only=True)
    res = foundry('train', run/'config.yaml', '--run-dir', run, env=dict(CUDA_VISIBLE_DEVICES=''))
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'from step-00000010: continuing at step 11' in res.stderr and state(run)['status'] == 'completed'
    ref = tmp_path/'ref'
    assert foundry('train', run/'config.yaml', '--run-dir', ref, env=dict(CUDA_VISIBLE_DEVICES='')).returncode == 0
    made_on = json.loads((FIXTURES/'gpu_run'/'environment.json').read_text())['fixture']
    if made_on.startswith('trained on CPU'):  # the reference's arithmetic: identical to the last bit where this CPU rounds alike
        print(assert_resumed_as_one_go(run/'checkpoints'/'step-00000020', ref/'checkpoints'/'step-00000020',
                                       FIXTURES/'gpu_run'/'checkpoints'/'step-00000010', ref/'checkpoints'/'step-00000010'))


@pytest.mark.gpu
def test_checkpoint_written_on_cuda_resumes_on_cpu_for_real(tmp_path, cache_dir):
    if not torch.cuda.is_available(): pytest.skip('needs a CUDA device')
    cfg, run = write_config(tmp_path, precision='fp32'), tmp_path/'run'
    with pytest.raises(RunInterrupted): train(load_config(cfg), run, progress=False, callbacks=[StopAfter(20)])
    assert torch.load(run/'checkpoints'/'step-00000020'/'optimizer.pt', weights_only=True, map_location=None)['state'][0]['exp_avg'].is_cuda
    res = foundry('train', cfg, '--run-dir', run, env=dict(CUDA_VISIBLE_DEVICES=''))
    assert res.returncode == 0 and 'continuing at step 21' in res.stderr, res.stderr[-3000:]


def running_as(run, pid) -> bool:
    try: return state(run).get('status') == 'running' and state(run).get('pid') == pid
    except (OSError, ValueError): return False


@pytest.mark.slow
def test_second_trainer_on_a_live_run_directory_is_refused(tmp_path, cache_dir):
    cfg, run = write_config(tmp_path, steps=100_000, every=200), tmp_path/'run'
    first = start_train(cfg, run)
    try:
        assert wait_until(lambda: running_as(run, first.pid) and (run/'checkpoints'/'step-00000200'/'COMPLETE').exists())
        metrics = (run/'metrics.jsonl').read_text()
        for args in (('train', cfg, '--run-dir', run), ('job', 'train', cfg, '--run-dir', run)):
            res = foundry_here(*args, cwd=tmp_path)
            assert res.returncode == 2, (args, res.stderr[-2000:])
            assert res.stderr.strip().splitlines() == [res.stderr.strip()] and f'being trained by process {first.pid}' in res.stderr, res.stderr
        assert not list(run.glob('train*.ipynb'))  # the refused job touched nothing
        assert (run/'metrics.jsonl').read_text().startswith(metrics) and '"resume"' not in (run/'metrics.jsonl').read_text()
        assert (run/'trainer.lock').read_text().strip() == str(first.pid)
    finally:
        first.kill(); first.wait()
    # a killed trainer leaves its lock file behind; the next trainer takes it over and resumes
    assert (run/'trainer.lock').read_text().strip() == str(first.pid)
    third = start_train(cfg, run)
    assert wait_until(lambda: running_as(run, third.pid))
    assert (run/'trainer.lock').read_text().strip() == str(third.pid) and state(run)['resumed_from'].startswith('step-')
    third.send_signal(signal.SIGTERM)
    _, err = third.communicate(timeout=60)
    assert third.returncode == 143, err[-2000:]
    assert not (run/'trainer.lock').exists() and state(run)['status'] == 'interrupted'


@pytest.fixture
def small_fs(tmp_path):
    "A real 4 MB tmpfs mounted for the test (root only), or None where mounting is not allowed."
    d = tmp_path/'small'; d.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(d)], capture_output=True).returncode:
        yield None; return
    try: yield d
    finally: subprocess.run(['umount', '-l', str(d)], capture_output=True)


def fill(fs: Path, leave: int = 96 * 1024) -> list[Path]:
    "Fill the filesystem `fs` with ballast files, then free about `leave` bytes: small writes fit, a checkpoint does not."
    files, chunk = [], b'\0' * 16384
    try:
        while True:
            p = fs/f'ballast-{len(files)}'
            files.append(p)
            with open(p, 'wb') as f: f.write(chunk)
    except OSError: pass
    for _ in range(leave // len(chunk)): files.pop().unlink(missing_ok=True)
    return files


@pytest.mark.slow
def test_disk_full_during_checkpoint_keeps_previous_and_resumes_bit_exact(tmp_path, cache_dir, small_fs, monkeypatch, capsys):
    cfg, ref = write_config(tmp_path, steps=60), tmp_path/'ref'
    assert foundry_here('train', cfg, '--run-dir', ref).returncode == 0
    if small_fs is not None:  # a real full disk: a 4 MB tmpfs, filled by this test while the trainer is paused
        print('disk full: real (tmpfs filled while training)')
        run = small_fs/'run'
        proc = start_train(cfg, run)
        assert wait_until(lambda: (run/'checkpoints'/'step-00000020'/'COMPLETE').exists() or proc.poll() is not None)
        proc.send_signal(signal.SIGSTOP)
        kept = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in list_checkpoints(run/'checkpoints')}
        ballast = fill(small_fs)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        code, lines = proc.returncode, err.strip().splitlines()
    else:  # no mount allowed here: the write fails with an injected ENOSPC (the real fault cannot be produced)
        print('disk full: injected ENOSPC at the checkpoint write (no filesystem could be mounted)')
        import model_foundry.loop as loop
        from model_foundry.cli import main
        run, real, ballast = tmp_path/'run', loop.save_checkpoint, []
        def full(root, model, st, *a, **kw):
            if st.step == 30: raise OSError(28, 'No space left on device', str(Path(root)/'step-00000030'))
            return real(root, model, st, *a, **kw)
        monkeypatch.setattr(loop, 'save_checkpoint', full)
        with pytest.raises(RunInterrupted): train(load_config(cfg), run, progress=False, callbacks=[StopAfter(20)])
        kept = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in list_checkpoints(run/'checkpoints')}
        code = main(['train', str(cfg), '--run-dir', str(run)])
        lines = capsys.readouterr().err.strip().splitlines()
        monkeypatch.setattr(loop, 'save_checkpoint', real)
    assert code == 1, lines[-20:]
    assert lines[-1].startswith('foundry: error: No space left on device: ') and 'checkpoints' in lines[-1], lines[-5:]
    assert not any('Traceback' in l for l in lines)
    assert state(run)['status'] == 'failed' and 'No space left on device' in state(run)['error']
    assert not [p.name for p in (run/'checkpoints').iterdir() if p.name.startswith('.tmp-')]  # the partial write is gone
    for name, files in kept.items():  # the previous checkpoints, untouched and intact
        assert {f.name: f.read_bytes() for f in (run/'checkpoints'/name).iterdir()} == files and verify_checkpoint(run/'checkpoints'/name) is None
    for p in ballast: p.unlink()  # space freed: the same command resumes, and ends where an undisturbed run ends
    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert state(run)['status'] == 'completed' and state(run)['resumed_from'] in kept
    assert same_weights(run/'final', ref/'final') and same_weights(run/'checkpoints'/'step-00000060', ref/'checkpoints'/'step-00000060')
    loss = lambda r: {x['step']: x['loss'] for x in map(json.loads, (r/'metrics.jsonl').read_text().splitlines()) if x['type'] == 'train'}
    assert loss(run) == loss(ref)
