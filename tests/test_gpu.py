"""The GPU tier (`make test-gpu`; CI has no GPU and deselects the marker): CUDA training in bf16 and fp16, the loss scaler across
resume, a real out-of-memory and the retry, the batch-size finder against a real allocator limit, the attention choices and
torch.compile with inductor. QLoRA on CUDA and a CUDA checkpoint resumed on CPU are in test_finetune.py and test_run_safety.py."""
import json
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE
from model_foundry.fixtures import StopAfter, tiny_config
from model_foundry.run import RunInterrupted, train

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda():
    if not torch.cuda.is_available(): pytest.skip('needs a CUDA device')
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def records(run, kind='train') -> list[dict]:
    return [r for r in map(json.loads, (Path(run)/'metrics.jsonl').read_text().splitlines()) if r['type'] == kind]


def config(tmp_path, **training):
    return tiny_config(tmp_path, data=dict(source_corpus=str(SHAKESPEARE), batch_size=16, max_sequence_length=64),
                       model=dict(layers=2, embedding_size=128, attention_heads=4),
                       training={**dict(device='cuda', train_steps=40, eval_interval=20, log_interval=5), **training})


def test_cuda_bf16_autocast_run_learns_and_reports_memory(tmp_path, cache_dir):
    st = train(config(tmp_path), tmp_path/'run', progress=False)
    tr = records(tmp_path/'run')
    assert st['status'] == 'completed' and tr[-1]['loss'] < tr[0]['loss']
    last = tr[-1]
    assert last['gpu_reserved_mb'] >= last['gpu_allocated_mb'] > 0 and last['gpu_reserved_gap_mb'] >= 0 and last['gpu_peak_reserved_mb'] > 0
    env = json.loads((tmp_path/'run'/'environment.json').read_text())
    print(f"\nGPU bf16 tiny: {last['tokens_per_s']:.0f} tokens/s, peak allocated {last['gpu_peak_allocated_mb']} MiB, "
          f"reserved-allocated gap {last['gpu_reserved_gap_mb']} MiB on {env.get('gpu') or env.get('device')}")


def test_fp16_loss_scaler_state_survives_resume(tmp_path, cache_dir):
    cfg = config(tmp_path, precision='fp16', checkpoint_interval=10)
    with pytest.raises(RunInterrupted): train(cfg, tmp_path/'cut', progress=False, callbacks=[StopAfter(10)])
    saved = torch.load(tmp_path/'cut'/'checkpoints'/'step-00000010'/'scaler.pt', weights_only=True)
    assert saved['scale'] > 0 and '_growth_tracker' in saved
    assert train(cfg, tmp_path/'cut', progress=False)['status'] == 'completed'
    assert train(cfg, tmp_path/'whole', progress=False)['status'] == 'completed'
    a = torch.load(tmp_path/'cut'/'checkpoints'/'step-00000040'/'scaler.pt', weights_only=True)
    b = torch.load(tmp_path/'whole'/'checkpoints'/'step-00000040'/'scaler.pt', weights_only=True)
    assert a['scale'] == b['scale'] and a['_growth_tracker'] == b['_growth_tracker'], (a, b)  # the scaler went on where it stopped
    la, lb = records(tmp_path/'cut')[-1]['loss'], records(tmp_path/'whole')[-1]['loss']
    assert abs(la - lb) < 1e-2, (la, lb)


def _capped(fraction_gib: float):
    "Cap this process's CUDA allocator (a real limit: the allocator raises torch.OutOfMemoryError above it)."
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(fraction_gib * 2**30 / total)


def big(tmp_path, batch: int, **training):
    return tiny_config(tmp_path, data=dict(source_corpus=str(SHAKESPEARE), batch_size=batch, max_sequence_length=512),
                       model=dict(layers=8, embedding_size=512, attention_heads=8),
                       training={**dict(device='cuda', precision='fp32', attention='eager', train_steps=2, eval_interval=2, eval_batches=1,
                                        log_interval=1), **training})


def test_real_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, cache_dir, caplog):
    _capped(3.0)  # eager fp32 attention over 512 tokens: a micro-batch of 64 needs far more than 3 GiB, 8 needs less
    with caplog.at_level('WARNING', logger='model_foundry'):
        st = train(big(tmp_path, 64), tmp_path/'run', progress=False)
    assert st['status'] == 'completed', st
    retries = [r.getMessage() for r in caplog.records if 'retrying with micro-batch' in r.getMessage()]
    assert retries and all('same effective batch of 64' in m for m in retries), caplog.text[-2000:]
    assert records(tmp_path/'run')[-1]['samples_seen'] == 2 * 64
    print(f"\nreal OOM under a 3 GiB cap: {retries}")


def test_batch_size_finder_backs_off_on_a_real_out_of_memory(tmp_path, cache_dir):
    from model_foundry.validate import tune_batch
    _capped(3.0)
    r = tune_batch(big(tmp_path, 8, gradient_accumulation_steps=8), tmp_path/'run', progress=False)
    failed = [m for m, ok in r['trials'] if not ok]
    assert failed and r['largest_fitting'] < min(failed) and r['batch_size'] * r['gradient_accumulation_steps'] == 64, r
    print(f"\ntune-batch under a 3 GiB cap: trials {r['trials']} -> {r['batch_size']} x {r['gradient_accumulation_steps']}")


def test_attention_implementations_on_cuda(tmp_path, cache_dir):
    import importlib.util
    from model_foundry.compute import set_attention
    from model_foundry.config import ModelConfig
    from model_foundry.model import build_model
    m = build_model(ModelConfig(architecture='llama', layers=2, embedding_size=128, attention_heads=4), 97, 64, seed=0).cuda().to(torch.bfloat16)
    x = torch.randint(0, 97, (4, 64), device='cuda')
    out = {}
    for impl in ('eager', 'sdpa', 'flash_attention_2'):
        chosen = set_attention(m, impl, 'cuda', 'bf16')
        with torch.no_grad(): out[chosen] = m(x).logits.float()
    assert chosen == ('flash_attention_2' if importlib.util.find_spec('flash_attn') else 'sdpa')
    assert (out['eager'] - out['sdpa']).abs().max().item() < 0.1  # bf16: the same function to bf16 rounding
    print(f"\nattention on CUDA: flash_attention_2 -> {chosen}; eager vs sdpa max |diff| {(out['eager'] - out['sdpa']).abs().max().item():.3g}")


def test_inductor_compiled_cuda_run_checkpoint_loads_without_compile(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM
    torch._dynamo.reset()
    st = train(config(tmp_path, compile=True, train_steps=20, eval_interval=10), tmp_path/'run', progress=False)
    assert st['status'] == 'completed'
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path/'run'/'checkpoints'/'step-00000020')
    assert torch.isfinite(loaded(torch.randint(0, loaded.config.vocab_size, (2, 16))).logits).all()
    print(f"\ninductor on CUDA: {records(tmp_path/'run')[-1]['tokens_per_s']:.0f} tokens/s after compiling")
