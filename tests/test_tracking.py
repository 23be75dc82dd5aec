"""W&B tracking and model artifacts with the real wandb library in offline and disabled mode.

The online upload's success, failure and timeout cannot be produced by the real service here (no
network): those tests replace `model_foundry.tracking.confirm_upload`, the one call that waits on the
service for the artifact, and say so. Everything else is real: training, files, wandb's offline run
and its artifact staging."""
import hashlib, json, os, shutil, time
from pathlib import Path

import pytest
import torch

import model_foundry.tracking as tracking
from model_foundry.checkpointing import list_checkpoints
from model_foundry.cli import main as foundry_main
from model_foundry.config import ExperimentConfig
from model_foundry.run import RunInterrupted, train
from model_foundry.tracking import UploadFailed

from model_foundry.fixtures import DegradeAfter, StopAfter

SECRET = 'local-test-key-0123456789abcdef0123456789abcdef01234567'


@pytest.fixture
def wandb_env(tmp_path, monkeypatch, cache_dir):
    "wandb's directories in a temp dir, and an API key that must never reach the run directory."
    home = tmp_path/'wandb-home'
    for k in ('WANDB_DIR', 'WANDB_DATA_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR'): monkeypatch.setenv(k, str(home))
    monkeypatch.setenv('WANDB_API_KEY', SECRET)
    monkeypatch.delenv('WANDB_MODE', raising=False)
    import wandb
    wandb.teardown()  # wandb keeps process-wide settings (its directories among them) from its first setup
    yield home
    wandb.teardown()


def tiny_cfg(corpus, mode='offline', steps=40, keep_local=False, **training):
    return ExperimentConfig(
        experiment_name='tracked', random_seed=5,
        data=dict(source_corpus=str(corpus), batch_size=8, max_sequence_length=32),
        tokenizer=dict(kind='char'), model=dict(layers=1, embedding_size=32, attention_heads=2),
        training=dict(train_steps=steps, eval_interval=10, eval_batches=2, checkpoint_interval=10, keep_checkpoints=2,
                      keep_local_checkpoints=keep_local, **training),
        logging=dict(use_wandb=mode is not None, wandb_mode=mode or 'disabled'))


def sha(path): return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def staged_hashes(home):
    return {sha(p) for p in (Path(home)/'artifacts'/'staging').rglob('*') if p.is_file()}


@pytest.mark.slow
def test_best_checkpoint_is_uploaded_as_final_model_artifact(tmp_path, wandb_env, shakespeare):
    run = tmp_path/'run'
    state = train(tiny_cfg(shakespeare, keep_local=True), run, progress=False, callbacks=[DegradeAfter(20)])
    assert state['status'] == 'completed' and state['best_step'] == 20 and state['step'] == 40
    assert state['upload'] == 'awaiting_sync' and state['artifact'] == 'tracked-model:latest'
    assert state['wandb_sync'].startswith('wandb sync ') and Path(state['wandb_sync'].split(' ', 2)[2]).is_dir()
    # final/ is the best checkpoint's model, and exactly that file was staged by wandb for upload
    from safetensors.torch import load_file
    final, best = load_file(str(run/'final'/'model.safetensors')), load_file(str(run/'checkpoints'/'step-00000020'/'model.safetensors'))
    assert torch.equal(final['transformer.wte.weight'], best['lm_head.weight'])
    staged = staged_hashes(wandb_env)
    for f in ('model.safetensors', 'config.json', 'tokenizer.json', 'evaluation.json'): assert sha(run/'final'/f) in staged, f
    assert sha(run/'checkpoints'/'step-00000040'/'model.safetensors') not in staged
    # the offline W&B run is on disk, and the API key is nowhere in the run directory or the metrics
    (offline,) = (wandb_env/'wandb').glob(f"offline-run-*-{state['tracker_run_id']}")
    assert (offline/f"run-{state['tracker_run_id']}.wandb").is_file()
    for p in run.rglob('*'):
        if p.is_file(): assert SECRET.encode() not in p.read_bytes(), p


@pytest.mark.slow
def test_checkpoint_cleanup_occurs_after_successful_artifact_upload(tmp_path, wandb_env, shakespeare, monkeypatch):
    run, seen = tmp_path/'run', []
    def confirmed(wrun, artifact, timeout):  # stands in for the service confirming the upload
        seen.append([p.name for p in list_checkpoints(run/'checkpoints')])
        return 'uploaded'
    monkeypatch.setattr(tracking, 'confirm_upload', confirmed)
    state = train(tiny_cfg(shakespeare), run, progress=False)
    assert seen and seen[0], 'checkpoints must still exist while the upload is being confirmed'
    assert state['upload'] == 'uploaded' and state['checkpoints_deleted'] == len(seen[0])
    assert list_checkpoints(run/'checkpoints') == [] and (run/'final'/'model.safetensors').is_file()


@pytest.mark.slow
def test_checkpoint_preservation_when_artifact_upload_fails(tmp_path, wandb_env, shakespeare, monkeypatch):
    run, attempts = tmp_path/'run', []
    def broken(wrun, artifact, timeout):  # stands in for a failed upload
        attempts.append(timeout); raise ConnectionError('upload failed (injected)')
    monkeypatch.setattr(tracking, 'confirm_upload', broken)
    cfg = tiny_cfg(shakespeare)
    cfg.logging.wandb_upload_retries = 2
    with pytest.raises(UploadFailed, match='retry with `foundry upload RUN_DIR`'):
        train(cfg, run, progress=False)
    assert len(attempts) == 2
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'upload_pending' and state['upload'] == 'pending'
    kept = [p.name for p in list_checkpoints(run/'checkpoints')]
    assert kept and (run/'final'/'model.safetensors').is_file()
    # training again does not retrain; `foundry upload` retries and, once confirmed, cleans up
    assert train(cfg, run, progress=False)['status'] == 'upload_pending'
    monkeypatch.setattr(tracking, 'confirm_upload', lambda wrun, artifact, timeout: 'uploaded')
    assert foundry_main(['upload', str(run)]) == 0
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'completed' and state['upload'] == 'uploaded' and list_checkpoints(run/'checkpoints') == []


@pytest.mark.slow
def test_upload_timeout_keeps_checkpoints_and_marks_run_pending(tmp_path, wandb_env, shakespeare, monkeypatch, capsys):
    run = tmp_path/'run'
    def times_out(wrun, artifact, timeout):  # stands in for a service that never confirms
        raise TimeoutError(f'artifact not confirmed within {timeout}s (injected)')
    monkeypatch.setattr(tracking, 'confirm_upload', times_out)
    cfg = tiny_cfg(shakespeare)
    cfg.logging.wandb_upload_timeout, cfg.logging.wandb_upload_retries = 0.5, 1
    cfg_path = tmp_path/'c.yaml'
    import yaml; cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode='json')))
    code = foundry_main(['train', str(cfg_path), '--run-dir', str(run)])
    err = capsys.readouterr().err
    assert code == 1 and 'was not confirmed by W&B after 1 attempts' in err.splitlines()[-1]
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'upload_pending'
    assert len(list_checkpoints(run/'checkpoints')) >= 2 and (run/'final'/'config.json').is_file()


@pytest.mark.slow
def test_resumed_run_continues_same_wandb_run(tmp_path, wandb_env, shakespeare):
    run, cfg = tmp_path/'run', tiny_cfg(shakespeare, keep_local=True)
    with pytest.raises(RunInterrupted): train(cfg, run, progress=False, callbacks=[StopAfter(15)])
    first = json.loads((run/'state.json').read_text())
    run_id = first['tracker_run_id']
    time.sleep(1.1)  # wandb names offline sessions by the second they start; a real resume comes later than this one
    assert first['status'] == 'interrupted' and len(run_id) == 8
    state = train(cfg, run, progress=False)
    assert state['status'] == 'completed' and state['tracker_run_id'] == run_id == state['wandb_run_id']
    # two offline sessions of the one W&B run id (wandb sync merges them into the same run)
    assert len(list((wandb_env/'wandb').glob(f'offline-run-*-{run_id}'))) == 2
    # checkpoints carry the tracker run id
    from model_foundry.checkpointing import read_trainer_state
    assert read_trainer_state(run/'checkpoints'/'step-00000040').tracker_run_id == run_id


@pytest.mark.slow
def test_disabled_tracking_builds_no_artifact_and_keeps_checkpoints(tmp_path, wandb_env, shakespeare):
    state = train(tiny_cfg(shakespeare, mode='disabled'), tmp_path/'run', progress=False)
    assert 'upload' not in state and 'tracker_run_id' not in state
    assert not (wandb_env/'artifacts').exists() and not (tmp_path/'run'/'wandb').exists()
    assert list_checkpoints(tmp_path/'run'/'checkpoints')


@pytest.mark.slow
def test_model_config_fetched_from_wandb_and_cached_locally(tmp_path, wandb_env, shakespeare, monkeypatch, capsys):
    run = tmp_path/'run'
    train(tiny_cfg(shakespeare, mode=None), run, progress=False)
    capsys.readouterr()
    remote = tmp_path/'remote'; shutil.copytree(run/'final', remote)  # stands in for the W&B service's copy
    calls = []
    def fetch(ref, dest):
        calls.append(ref); shutil.copytree(remote, dest, dirs_exist_ok=True)
    monkeypatch.setattr(tracking, 'download_artifact', fetch)
    args = ['generate', 'wandb:me/proj/tracked-model:best', '--prompt', 'ROMEO:', '--temperature', '0', '--max-new-tokens', '20']
    assert foundry_main(args) == 0
    first = capsys.readouterr().out
    shutil.rmtree(remote)  # the "service" is gone: the second call must not need it
    assert foundry_main(args) == 0
    assert capsys.readouterr().out == first and calls == ['me/proj/tracked-model:best']
    cached = tracking.artifact_cache_dir('me/proj/tracked-model:best')
    assert cached.is_relative_to(Path(os.environ['FOUNDRY_CACHE'])) and json.loads((cached/'config.json').read_text())['model_type'] == 'gpt2'
    assert foundry_main(['generate', str(run), '--prompt', 'ROMEO:', '--temperature', '0', '--max-new-tokens', '20']) == 0
    assert capsys.readouterr().out == first  # the same model as the run's own final/


@pytest.mark.slow
def test_unreachable_wandb_in_online_mode_falls_back_to_offline_and_training_goes_on(tmp_path, wandb_env, shakespeare, monkeypatch, caplog):
    # a real online init against a closed port on this machine's loopback: W&B is "unreachable"
    monkeypatch.setenv('WANDB_BASE_URL', 'http://127.0.0.1:9')
    cfg = tiny_cfg(shakespeare, mode='online', steps=20)
    cfg.logging.wandb_init_timeout = 3
    with caplog.at_level('WARNING', logger='model_foundry'):
        state = train(cfg, tmp_path/'run', progress=False)
    assert 'W&B unreachable' in caplog.text and 'continuing offline' in caplog.text
    assert state['status'] == 'completed' and state['upload'] == 'awaiting_sync'
    assert list((wandb_env/'wandb').glob(f"offline-run-*-{state['tracker_run_id']}"))


@pytest.mark.slow
def test_wandb_agent_run_id_names_a_new_run_but_not_a_resumed_one(tmp_path, wandb_env, shakespeare, monkeypatch):
    # a W&B sweep agent starts its command with WANDB_RUN_ID set: the run must log to that W&B run
    monkeypatch.setenv('WANDB_RUN_ID', 'agentrun1')
    run = tmp_path/'run'
    with pytest.raises(RunInterrupted): train(tiny_cfg(shakespeare, steps=20), run, progress=False, callbacks=[StopAfter(10)])
    assert json.loads((run/'state.json').read_text())['tracker_run_id'] == 'agentrun1'
    assert list((wandb_env/'wandb').glob('offline-run-*-agentrun1'))
    # resumed later from another environment, the run keeps its own id
    monkeypatch.setenv('WANDB_RUN_ID', 'someother')
    state = train(tiny_cfg(shakespeare, steps=20), run, progress=False)
    assert state['status'] == 'completed' and state['tracker_run_id'] == 'agentrun1'
