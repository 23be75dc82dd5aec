"""Render nbs/index.ipynb to README.md (Quarto, which nbdev-readme needs, cannot be installed here).

Markdown cells are copied; code cells become fenced python blocks; cells marked `#| hide` are skipped."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nb = json.loads((root/'nbs'/'index.ipynb').read_text())
parts = []
for cell in nb['cells']:
    src = ''.join(cell['source']).strip('\n')
    if cell['cell_type'] == 'markdown': parts.append(src)
    elif cell['cell_type'] == 'code':
        lines = src.splitlines()
        if any(l.strip() in ('#| hide', '#|hide') for l in lines): continue
        code = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
        if code: parts.append(f'```python\n{code}\n```')
out = '<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->\n\n' + '\n\n'.join(parts) + '\n'
(root/'README.md').write_text(out)
