"""The embeddings index on real code: the real all-MiniLM-L6-v2 model, real Qdrant (local on-disk mode), stdlib sources."""
import sysconfig, time
from pathlib import Path

import pytest

from model_foundry.config import ConfigError
from model_foundry.embeddings import (COLLECTION, Embedder, chunk_file, chunk_id, contaminated_paths, contamination, index_chunks,
                                 load_embedder, near_duplicate_pairs, open_index, search)

pytestmark = pytest.mark.slow
STDLIB = Path(sysconfig.get_paths()['stdlib'])
# a haystack of ~400 chunks of 19 modules (the embedding is most of this file's time: 32 modules and ~940 chunks took a minute)
MODULES = ['textwrap', 'heapq', 'bisect', 'shlex', 'fnmatch', 'colorsys', 'glob', 'string', 'keyword', 'reprlib', 'numbers', 'abc',
           'copy', 'queue', 'graphlib', 'sched', 'stat', 'getopt', 'calendar']

LEVENSHTEIN = '''use std::cmp::min;

/// The Levenshtein distance of `a` and `b`: the fewest single-character insertions, deletions and substitutions
/// that turn one into the other.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let cur = row[j + 1];
            row[j + 1] = min(min(row[j + 1] + 1, row[j] + 1), prev + if ca == b[j] { 0 } else { 1 });
            prev = cur;
        }
    }
    row[b.len()]
}
'''

WEIGHTED_MEDIAN = '''def weighted_median(values, weights):
    "The value below which half of the total weight lies."
    pairs = sorted(zip(values, weights))
    half = sum(weights) / 2
    running = 0
    for value, weight in pairs:
        running += weight
        if running >= half:
            return value
    raise ValueError("no values")
'''

SLUGIFY = '''def slugify(title):
    "A URL slug of a title: lower case words joined by hyphens, punctuation dropped."
    words = "".join(ch if ch.isalnum() else " " for ch in title.lower()).split()
    return "-".join(words)
'''

UNRELATED = '''def parse_ini_line(line):
    "A (key, value) pair from one `key = value` line of an INI file, or None for comments and blank lines."
    line = line.strip()
    if not line or line.startswith((";", "#")) or "=" not in line:
        return None
    key, value = line.split("=", 1)
    return key.strip(), value.strip()
'''


@pytest.fixture(scope='module')
def embedder():
    return load_embedder()


@pytest.fixture
def index_dir(tmp_path):
    return tmp_path/'index'


def stdlib_chunks(modules) -> list:
    return [c for m in modules for c in chunk_file(f'cpython/Lib/{m}.py', (STDLIB/f'{m}.py').read_text(encoding='utf-8'))]


def test_search_returns_the_planted_function_first(embedder, index_dir):
    chunks = stdlib_chunks(MODULES) + chunk_file('planted/src/edit.rs', LEVENSHTEIN)
    assert len(chunks) > 400 and len({c.chunk_id for c in chunks}) == len(chunks)
    client = open_index(index_dir)
    try:
        t0 = time.perf_counter()
        stats = index_chunks(client, chunks, embedder, progress=False)
        dt = time.perf_counter() - t0
        print(f'\nindexed {stats["embedded"]} chunks of {len(MODULES)} stdlib modules in {dt:.1f} s: '
              f'{stats["embedded"] / dt:.1f} chunks/s (embedding + local Qdrant upsert)')
        assert stats == dict(chunks=len(chunks), embedded=len(chunks), deleted=0, dim=384, model='all-MiniLM-L6-v2')
        hits = search(client, embedder, 'edit distance between two strings', k=5)
        assert (hits[0]['path'], hits[0]['name'], hits[0]['kind']) == ('planted/src/edit.rs', 'levenshtein', 'function')
        assert hits[0]['start_line'] == 3 and hits[0]['text'].startswith('/// The Levenshtein distance')  # its doc comment too
        assert all(h['path'].startswith('cpython/') for h in hits[1:])
        wrap = search(client, embedder, 'wrap a paragraph of text to a given line width', k=1)
        assert wrap[0]['path'] == 'cpython/Lib/textwrap.py'
    finally:
        client.close()


def test_validation_code_near_duplicated_in_train_is_reported_by_the_index(embedder, index_dir):
    copied = WEIGHTED_MEDIAN.replace('running', 'acc')  # the same function, a variable renamed
    assert copied != WEIGHTED_MEDIAN
    chunks = (stdlib_chunks(['statistics', 'textwrap', 'shlex']) + chunk_file('proj/eval/scoring.py', WEIGHTED_MEDIAN, split='val')
              + chunk_file('proj/train/stats_copy.py', copied) + chunk_file('proj/train/text_utils.py', SLUGIFY)
              + chunk_file('proj/train/unrelated.py', UNRELATED))
    prompts = [SLUGIFY.split('\n    words')[0] + '\n',  # a completion prompt: the signature and docstring of a train function
               'Write a short poem about autumn leaves.']
    client = open_index(index_dir)
    try:
        index_chunks(client, chunks, embedder, progress=False)
        report = contamination(client, embedder, threshold=0.9, prompts=prompts)
        assert [(r['train'], r['neighbour']) for r in report] == [('proj/train/stats_copy.py:1-10', 'proj/eval/scoring.py:1-10'),
                                                                 ('proj/train/text_utils.py:1-4', 'prompt:0')]
        assert all(0.9 <= r['score'] <= 1.0 for r in report)
        assert contaminated_paths(report) == ['proj/train/stats_copy.py', 'proj/train/text_utils.py']
        assert contamination(client, embedder, threshold=0.9, prompts=prompts) == report               # deterministic
        pairs = near_duplicate_pairs(client, threshold=0.9)
        assert ('proj/eval/scoring.py:1-10', 'proj/train/stats_copy.py:1-10') in [(p['a'], p['b']) for p in pairs]
        assert not any('unrelated' in p['a'] + p['b'] for p in pairs)
        kept = [c for c in chunks if c.path not in contaminated_paths(report)]
        assert index_chunks(client, kept, embedder, progress=False)['deleted'] == 2
        assert contamination(client, embedder, threshold=0.9, prompts=prompts) == []                  # dropped: clean
    finally:
        client.close()


def test_reindex_embeds_only_changed_chunks(embedder, index_dir):
    files = {f'cpython/Lib/{m}.py': (STDLIB/f'{m}.py').read_text(encoding='utf-8') for m in ['bisect', 'colorsys', 'fnmatch']}
    files['proj/train/unrelated.py'] = UNRELATED
    build = lambda fs: [c for p, t in sorted(fs.items()) for c in chunk_file(p, t)]
    old = build(files)
    client = open_index(index_dir)
    first = index_chunks(client, old, embedder, progress=False)
    client.close()
    assert first['embedded'] == len(old)
    changed = dict(files, **{'proj/train/unrelated.py': UNRELATED.replace('return None', 'return ()')})  # one line edited in place
    new = build(changed)
    client = open_index(index_dir)                                          # a later build reopens the same directory
    try:
        assert index_chunks(client, old, embedder, progress=False)['embedded'] == 0
        stats = index_chunks(client, new, embedder, progress=False)
        old_ids, new_ids = {c.chunk_id for c in old}, {c.chunk_id for c in new}
        assert (stats['embedded'], stats['deleted']) == (len(new_ids - old_ids), len(old_ids - new_ids)) == (1, 1)
        assert client.count(COLLECTION).count == len(new)
        assert client.retrieve(COLLECTION, sorted(old_ids - new_ids)) == []  # the stale chunk is gone
        del changed['cpython/Lib/fnmatch.py']
        changed['cpython/Lib/heapq.py'] = (STDLIB/'heapq.py').read_text(encoding='utf-8')
        swapped = build(changed)
        stats = index_chunks(client, swapped, embedder, progress=False)
        assert (stats['embedded'], stats['deleted']) == (len(chunk_file('x.py', changed['cpython/Lib/heapq.py'])),
                                                        len(chunk_file('x.py', files['cpython/Lib/fnmatch.py'])))
        assert sorted(str(i) for i in _ids(client)) == sorted(chunk_id(c) for c in swapped)
    finally:
        client.close()


def _ids(client) -> list:
    recs, _ = client.scroll(COLLECTION, limit=10_000, with_payload=False)
    return [r.id for r in recs]


def test_index_built_with_another_dimension_is_refused(embedder, index_dir):
    from qdrant_client import models
    chunks = chunk_file('proj/train/unrelated.py', UNRELATED)
    client = open_index(index_dir)
    try:
        # as a 768-dimension model would have made it
        client.create_collection(COLLECTION, vectors_config=models.VectorParams(size=768, distance=models.Distance.COSINE))
        with pytest.raises(ConfigError, match=r'another embedding model \(unknown, dimension 768\), not all-MiniLM-L6-v2 \(dimension 384\)'):
            index_chunks(client, chunks, embedder, progress=False)
        with pytest.raises(ConfigError, match='built with another embedding model'):
            search(client, embedder, 'ini file')
        assert client.count(COLLECTION).count == 0
        assert index_chunks(client, chunks, embedder, collection='minilm', progress=False)['embedded'] == len(chunks)
        other = Embedder('my-org/another-384d-model', embedder.model)  # same size, another model's name: refused too
        with pytest.raises(ConfigError, match=r"built with another embedding model \(all-MiniLM-L6-v2, dimension 384\)"):
            index_chunks(client, chunks, other, collection='minilm', progress=False)
    finally:
        client.close()
