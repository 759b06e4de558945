"""Prompt files: prompt i belongs to seed i (sample.py's --prompt_file, clip_score.py's --prompts).

Accepted forms, told apart by the file name's extension:
- .json: MS-COCO captions (`{"annotations": [{"caption": ...}, ...]}`, prompts in file order) or a
  plain JSON list of strings;
- .csv: a table with a `text` or `caption` column (e.g. the MS-COCO val2014 30k captions CSV the
  GITS paper's code uses);
- anything else: plain text, one prompt a line (blank lines are kept, they count as seeds, but
  an empty prompt is rejected where it is used).
"""

import csv
import io
import json
import os

from dnnlib.util import UserError


def read_prompt_file(path, flag='--prompt_file'):
    """List of prompts, index = seed. Raises UserError for a missing or malformed file."""
    try:
        with open(path, 'rb') as f:
            data = f.read().decode('utf-8-sig')
    except OSError as e:
        raise UserError(f'{flag}: cannot read "{path}": {e.strerror}') from None
    except UnicodeDecodeError:
        raise UserError(f'{flag}: "{path}" is not UTF-8 text') from None
    ext = os.path.splitext(str(path))[1].lower()
    parse = {'.json': _parse_json, '.csv': _parse_csv}.get(ext, _parse_lines)
    prompts = parse(data, path, flag)
    if not prompts:
        raise UserError(f'{flag}: "{path}" holds no prompts')
    return prompts


def _parse_lines(data, path, flag):
    lines = data.splitlines()
    while lines and not lines[-1].strip():     # a trailing newline is not a prompt
        lines.pop()
    return [line.strip() for line in lines]


def _parse_json(data, path, flag):
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise UserError(f'{flag}: "{path}" is not valid JSON ({e.msg}, line {e.lineno})') from None
    if isinstance(obj, dict) and isinstance(obj.get('annotations'), list):
        items = obj['annotations']
        if not all(isinstance(a, dict) and isinstance(a.get('caption'), str) for a in items):
            raise UserError(f'{flag}: "{path}": every entry of "annotations" needs a "caption" string')
        return [a['caption'].strip() for a in items]
    if isinstance(obj, list) and all(isinstance(p, str) for p in obj):
        return [p.strip() for p in obj]
    raise UserError(f'{flag}: "{path}" is neither MS-COCO captions JSON ({{"annotations": [{{"caption": ...}}]}}) '
                    f'nor a JSON list of strings')


def _parse_csv(data, path, flag):
    reader = csv.DictReader(io.StringIO(data))
    column = next((c for c in ('text', 'caption') if c in (reader.fieldnames or [])), None)
    if column is None:
        raise UserError(f'{flag}: "{path}" has no "text" or "caption" column (columns: {reader.fieldnames})')
    return [(row[column] or '').strip() for row in reader]
