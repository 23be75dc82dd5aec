"""LoRA and QLoRA training steps of model_foundry against a plain peft + transformers loop, side by side.

The same base (a StarCoder2 made here with `make_base_model`), the same LoRA settings, the same packed
batches (per-sample position ids), the same AdamW and schedule, in one process. The two loops alternate
step by step; each round reports the median step time of each, and the result is the median over rounds. Also printed: the
weight memory of the 4-bit base against the fp32 one.

    python benchmarks/finetune_throughput.py [--rounds 5] [--steps 20] [--layers 4] [--width 256] [--batch 8] [--seq 256] [--device cpu]

On a GPU, a small model at a small batch is bound by kernel launches (the host), and there any host-side
difference between two loops shows; `--layers 8 --width 2048 --batch 16 --seq 512` keeps the GPU busy.
"""
import argparse, statistics, sys, tempfile, time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from model_foundry.config import ExperimentConfig, resolve_config
from model_foundry.data import STDLIB, corpus_files, read_chunks
from model_foundry.finetune import DEFAULT_TARGETS, compute_dtype, make_base_model, parameter_report
from model_foundry.loop import make_scheduler, one_step
from model_foundry.model import autocast_for
from model_foundry.run import RunDir, build_learner, plan_run

FILES = ['heapq.py', 'bisect.py', 'textwrap.py', 'shlex.py', 'fnmatch.py', 'colorsys.py', 'graphlib.py', 'queue.py', 'sched.py', 'string.py',
         'glob.py', 'getopt.py', 'calendar.py', 'cmd.py', 'difflib.py', 'argparse.py']


def config(base, method, device, batch=8, seq=256) -> ExperimentConfig:
    return ExperimentConfig.model_validate(dict(
        experiment_name=f'bench-{method}', random_seed=0,
        data=dict(source_corpus='python-stdlib', include=FILES, format='files', batch_size=batch, max_sequence_length=seq, val_fraction=0.1),
        model=dict(init='pretrained', pretrained=str(base)),
        finetune=dict(method=method, lora_r=16, lora_alpha=32, lora_dropout=0.05),
        training=dict(train_steps=10**6, learning_rate=1e-3, warmup_steps=10, eval_interval=10**6, checkpoint_interval=10**6,
                      log_interval=10, device=device)))


def plain_model(cfg, device):
    "The same base and adapters set up the way peft's and transformers' documentation show it."
    f, dev = cfg.finetune, torch.device(cfg.training.device if cfg.training.device != 'auto' else device)
    dt = compute_dtype(f, dev)
    if f.method == 'qlora':
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=f.quant_type, bnb_4bit_use_double_quant=f.double_quant,
                               bnb_4bit_compute_dtype=dt)
        m = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, quantization_config=q, device_map={'': str(dev)}, dtype=dt)
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    else: m = AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, dtype=dt if dev.type == 'cuda' else torch.float32).to(dev)
    m = get_peft_model(m, LoraConfig(r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout,
                                      target_modules=DEFAULT_TARGETS['starcoder2'], task_type='CAUSAL_LM'))
    t = cfg.training
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                            eps=t.adam_epsilon, weight_decay=t.weight_decay, fused=dev.type in ('cpu', 'cuda'))
    return m, opt, make_scheduler(opt, t), dev


def plain_steps(model, opt, sched, dev, precision, blocks, start, n, bs, max_norm):
    "A plain loop over the same batches; per-step seconds."
    times = []
    model.train()
    for i in range(n):
        if dev.type == 'cuda': torch.cuda.synchronize()  # the previous step (of either loop) is not billed to this one
        t = time.perf_counter()
        x, y, pos = (v.to(dev) for v in blocks.batch(start + i * bs, bs))
        with autocast_for(dev, precision):
            logits = model(input_ids=x, position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=20, help='steps per loop per round')
    p.add_argument('--layers', type=int, default=4)
    p.add_argument('--width', type=int, default=256)
    p.add_argument('--device', default='auto')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq', type=int, default=256)
    p.add_argument('--methods', default='lora,qlora')
    a = p.parse_args(argv)
    device = torch.device('cuda' if a.device == 'auto' and torch.cuda.is_available() else 'cpu' if a.device == 'auto' else a.device)
    tmp = Path(tempfile.mkdtemp())
    texts = [c for f in corpus_files(STDLIB, FILES) for c in read_chunks(f)]
    base = make_base_model('starcoder2', tmp/'base', texts, vocab_size=2048, layers=a.layers, embedding_size=a.width,
                           attention_heads=max(1, a.width // 64), context_length=max(256, a.seq))
    print(f'device {device}, torch threads {torch.get_num_threads()}, base: StarCoder2 {a.layers} layers x {a.width}, batch {a.batch} x {a.seq} tokens')
    fp32 = AutoModelForCausalLM.from_pretrained(base)
    for method in a.methods.split(','):
        torch.manual_seed(0)
        cfg = config(base, method, str(device), a.batch, a.seq)
        prepared, resolved, _ = plan_run(cfg, RunDir(tmp/method), progress=False)
        learn = build_learner(resolved, prepared, RunDir(tmp/method), progress=False)
        model, opt, sched, dev = plain_model(resolved, device)
        learn('before_fit')
        sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
        bs, ours, plain, warm = resolved.data.batch_size, [], [], 3
        for r in range(a.rounds + 1):
            times, pl = [], []
            for i in range(a.steps):  # one step of each in turn (which goes first alternates), so that machine noise hits both alike
                def mine():  # callbacks included; all of its device work billed to it
                    sync(); t0 = time.perf_counter(); one_step(learn); sync(); times.append(time.perf_counter() - t0)
                def theirs():
                    pl.extend(plain_steps(model, opt, sched, dev, learn.precision, learn.dls.train, (r * a.steps + i) * bs, 1, bs,
                                          resolved.training.max_grad_norm))
                for f in ((mine, theirs) if (r + i) % 2 else (theirs, mine)): f()
            if r == 0: continue  # warm-up round
            ours.append(statistics.median(times)); plain.append(statistics.median(pl))
        o, pl = statistics.median(ours), statistics.median(plain)
        rep = parameter_report(learn.model, resolved.finetune)
        tok = bs * resolved.data.max_sequence_length
        print(f'{method:5s}: ours {o*1000:.1f} ms/step ({tok/o:,.0f} tokens/s), plain peft+transformers {pl*1000:.1f} ms/step; '
              f'ours / plain - 1 = {o/pl - 1:+.1%}; {rep["trainable"]:,} trainable of {rep["total"]:,}; precision {learn.precision}')
        if method == 'qlora':
            stored = lambda m: sum(p.numel() * p.element_size() for n, p in m.named_parameters() if 'lora_' not in n)
            q4, f32 = stored(learn.model), stored(fp32)
            print(f'frozen weight memory: 4-bit base {q4/2**20:.2f} MiB vs fp32 {f32/2**20:.2f} MiB: ratio {q4/f32:.3f} '
                  f'(embeddings and norms stay in {compute_dtype(resolved.finetune, device)}; linear layers alone: 0.5 bytes + scales per weight)')
        del learn, model, opt


if __name__ == '__main__':
    sys.exit(main())
