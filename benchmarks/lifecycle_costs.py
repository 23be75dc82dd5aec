"""What crash safety costs on the shakespeare-char config: checkpoint save time as a share of training
time at the default interval, and resume (restore) time from a checkpoint at step 10 vs step 1000.

Resuming restores weights, optimizer, scheduler and RNG states and sets the data position (a global
sample index): no batch is replayed, so resuming late should cost the same as resuming early.

    python benchmarks/lifecycle_costs.py [--corpus PATH] [--repeats 7]
"""
import argparse, statistics, sys, tempfile, time
from pathlib import Path

import model_foundry.loop as loop
from model_foundry.checkpointing import checkpoint_name
from model_foundry.config import load_config
from model_foundry.data import TokenBlocks, prepare
from model_foundry.config import resolve_config
from model_foundry.run import RunDir, build_learner, train
from model_foundry.loop import restore

REPO = Path(__file__).resolve().parent.parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--corpus', default=str(REPO/'data'/'tinyshakespeare'/'input.txt'))
    p.add_argument('--repeats', type=int, default=7)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())

    # 1. save time vs training time, default checkpoint interval (= eval interval, 250 steps)
    saves = []
    real_save = loop.save_checkpoint
    def timed_save(*args, **kw):
        t = time.perf_counter(); out = real_save(*args, **kw); saves.append(time.perf_counter() - t); return out
    loop.save_checkpoint = timed_save
    steps = []
    class StepTimes(loop.Callback):
        def after_step(self): steps.append(self.learn.state.step_time)
    cfg = load_config(REPO/'configs'/'shakespeare-char.yaml', [f'data.source_corpus={a.corpus}', 'training.train_steps=1000',
                                                               'training.log_spaced_checkpoints=0'])
    t0 = time.perf_counter()
    train(cfg, tmp/'run1000', progress=False, callbacks=[StepTimes()])
    wall = time.perf_counter() - t0
    loop.save_checkpoint = real_save
    print(f'1000 steps: {sum(steps):.1f} s in steps, {wall:.1f} s wall; {len(saves)} checkpoints saved in {sum(saves):.3f} s '
          f'({sum(saves)/len(saves)*1000:.1f} ms each) = {sum(saves)/sum(steps):.2%} of step time, {sum(saves)/wall:.2%} of wall time')

    # 2. restore time from step 10 vs step 1000 (alternating, medians)
    short = cfg.model_copy(update=dict(training=cfg.training.model_copy(update=dict(train_steps=10))))
    train(short, tmp/'run10', progress=False)
    prep = prepare(cfg.data, cfg.tokenizer, progress=False)
    resolved = resolve_config(cfg, len(TokenBlocks(prep.train, cfg.data.max_sequence_length)), prep.vocab_size)
    learn = build_learner(resolved, prep, RunDir(tmp/'scratch'), progress=False)
    times = {10: [], 1000: []}
    for _ in range(a.repeats):
        for step, run in ((10, 'run10'), (1000, 'run1000')):
            ck = tmp/run/'checkpoints'/checkpoint_name(step)
            t = time.perf_counter(); restore(learn, ck); times[step].append(time.perf_counter() - t)
            assert learn.state.step == step
    m10, m1000 = statistics.median(times[10]), statistics.median(times[1000])
    print(f'restore from step 10: {m10*1000:.1f} ms, from step 1000: {m1000*1000:.1f} ms (median of {a.repeats}); ratio {m1000/m10:.2f}')
    # the first batch after resume is read by index, whatever the step
    for step in (10, 1000):
        t = time.perf_counter(); learn.dls.train.batch(step * 12, 12); print(f'first batch at step {step}: {(time.perf_counter()-t)*1e6:.0f} us')


if __name__ == '__main__':
    sys.exit(main())
