"""How fast `foundry corpus` reads, cleans and embeds a repository of a few thousand files.

    OMP_NUM_THREADS=2 python benchmarks/corpus_throughput.py [--files 3000] [--embed-chunks 1000] [--rounds 3]

The repository is generated: the Python standard library's own files (tests and their data included, so there are thousands),
committed into a fresh git repository with pygit2. Printed, as medians of --rounds:
- scraping (every blob of HEAD's tree through pygit2) beside a reference reader: `git ls-tree` + `git cat-file --batch`;
- each step alone (filtering, redaction, exact and MinHash near dedup, one process), then the pipeline's `files` and `clean`
  phases as `foundry corpus` runs them (redaction in one process per core): files/s and MB/s;
- embedding + indexing (chunks embedded into local Qdrant) beside plain SentenceTransformer.encode of the same texts;
- peak resident memory of this process.
"""
import argparse, resource, statistics, subprocess, sys, sysconfig, tempfile, time
from pathlib import Path

from model_foundry.clean import exact_duplicates, file_decision, near_dedup, redact
from model_foundry.corpus import build_corpus, corpus_settings
from model_foundry.embeddings import chunk_file, index_chunks, load_embedder, open_index
from model_foundry.repo import make_repo, open_repo, tree_files


def stdlib_sources(n: int) -> dict:
    root = Path(sysconfig.get_paths()['stdlib'])
    files = sorted(p for p in root.rglob('*') if p.is_file() and not p.is_symlink() and not {'site-packages', '__pycache__'} & set(p.parts))[:n]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def git_reference(repo_dir: Path) -> int:
    "Bytes of every blob of HEAD read by the git command line (ls-tree, then one cat-file --batch)."
    ls = subprocess.run(['git', '-C', str(repo_dir), 'ls-tree', '-r', '-z', 'HEAD'], capture_output=True, check=True).stdout
    shas = [e.split(b'\t')[0].split()[2] for e in ls.split(b'\0') if e]
    out = subprocess.run(['git', '-C', str(repo_dir), 'cat-file', '--batch'], input=b'\n'.join(shas) + b'\n', capture_output=True, check=True).stdout
    return len(out)


def timed(fn, rounds):
    ts, res = [], None
    for _ in range(rounds):
        t = time.perf_counter(); res = fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts), res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--files', type=int, default=3000)
    ap.add_argument('--embed-chunks', type=int, default=1000)
    ap.add_argument('--rounds', type=int, default=3)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    src = stdlib_sources(a.files)
    t = time.perf_counter(); make_repo(tmp/'repo', [dict(files=src, message='the standard library')]); made = time.perf_counter() - t
    mb = sum(map(len, src.values())) / 1e6
    print(f'repository: {len(src):,} files, {mb:.1f} MB (committed in {made:.1f} s)')

    repo = open_repo(tmp/'repo')
    t_ours, files = timed(lambda: tree_files(repo, 'HEAD'), a.rounds)
    t_git, _ = timed(lambda: git_reference(tmp/'repo'), a.rounds)
    print(f'scrape   : {len(files)/t_ours:8,.0f} files/s {mb/t_ours:7.1f} MB/s   (git ls-tree + cat-file --batch: {len(files)/t_git:,.0f} files/s; '
          f'ours/git time = {t_ours/t_git:.2f})')

    t_f, decisions = timed(lambda: [file_decision(f.path, f.data) for f in files], a.rounds)
    kept = [f for f, (k, _) in zip(files, decisions) if k]
    print(f'filter   : {len(files)/t_f:8,.0f} files/s {mb/t_f:7.1f} MB/s   ({len(kept):,} kept)')
    texts = {f.path: f.data.decode() for f in kept}
    kmb = sum(map(len, texts.values())) / 1e6
    t_r, red = timed(lambda: {k: redact(v, k)[0] for k, v in texts.items()}, a.rounds)
    print(f'redact   : {len(texts)/t_r:8,.0f} files/s {kmb/t_r:7.1f} MB/s')
    t_e, ex = timed(lambda: exact_duplicates(red), a.rounds)
    print(f'exact    : {len(red)/t_e:8,.0f} files/s {kmb/t_e:7.1f} MB/s   ({len(ex)} duplicates)')
    rest = {k: v for k, v in red.items() if k not in ex}
    t_n, near = timed(lambda: near_dedup(rest), 1)
    print(f'near     : {len(rest)/t_n:8,.0f} files/s {kmb/t_n:7.1f} MB/s   ({len(near)} near-duplicates; one round)')
    total = t_ours + t_f + t_r + t_e + t_n
    print(f'steps alone, one process: {len(files)/total:,.0f} files/s, {mb/total:.2f} MB/s')
    t = time.perf_counter()
    build_corpus([tmp/'repo'], tmp/'corpus', corpus_settings(embed=False, history=False), progress=False, log=lambda *a: None)
    wall = time.perf_counter() - t
    sec = __import__('json').loads((tmp/'corpus'/'timings.json').read_text())['seconds']
    fc = sec['analyse'] + sec['files'] + sec['clean']
    print(f'pipeline : analyse+files+clean {len(files)/fc:,.0f} files/s {mb/fc:.2f} MB/s; whole build without index {wall:.1f} s '
          f'({", ".join(f"{k} {v:.1f}" for k, v in sec.items())})')

    chunks = [c for k in sorted(rest) for c in chunk_file(k, rest[k], 'Python')][:a.embed_chunks]
    emb = load_embedder()
    emb.encode([chunks[0].text])  # warm
    ours, plain = [], []
    for r in range(a.rounds):
        client = open_index(tmp/f'index-{r}')
        t = time.perf_counter(); index_chunks(client, chunks, emb, progress=False); ours.append(time.perf_counter() - t)
        client.close()
        t = time.perf_counter(); emb.encode([c.text for c in chunks], batch_size=64); plain.append(time.perf_counter() - t)
    o, p = statistics.median(ours), statistics.median(plain)
    print(f'embed    : {len(chunks)/o:8,.1f} chunks/s into Qdrant   (plain encode: {len(chunks)/p:,.1f} chunks/s; ours/plain time = {o/p:.2f})')
    print(f'peak RSS : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB in this process, '
          f'{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:,.0f} MiB in the largest cleaning worker')


if __name__ == '__main__':
    sys.exit(main())
