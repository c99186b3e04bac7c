"""An on-disk cache of judgements (SQLite, stdlib), so re-running an evaluation costs no judge calls.

The key is a SHA-256 of (judge id, request kind, question, answer, replies, reply): the judge id names the model and
the rubric version, so a new model or prompt never reads old results. Only parsed judgements are stored; an answer
the judge could not parse is asked again next time. Safe to share between threads of one process and between
processes (SQLite locking).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from edge_duet.errors import InputError

from .judges import Judgement, JudgeRequest


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-duet" / "judge-cache.sqlite"


def cache_key(judge_id: str, request: JudgeRequest) -> str:
    parts = [judge_id, request.kind, request.question, request.answer, list(request.replies), request.reply]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgements ("
                "key TEXT PRIMARY KEY, judge TEXT NOT NULL, kind TEXT NOT NULL, score INTEGER NOT NULL, "
                "raw TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise InputError(
                f"cannot open the judge cache {self.path}: {exc}. Pass another --cache PATH or --no-cache"
            ) from None
        self._lock = threading.Lock()

    def get(self, judge_id: str, request: JudgeRequest) -> Judgement | None:
        with self._lock:
            row = self._db.execute(
                "SELECT score, raw FROM judgements WHERE key = ?", (cache_key(judge_id, request),)
            ).fetchone()
        return None if row is None else Judgement(int(row[0]), row[1])

    def put(self, judge_id: str, request: JudgeRequest, judgement: Judgement) -> None:
        if judgement.score is None:
            return
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?)",
                (cache_key(judge_id, request), judge_id, request.kind, judgement.score, judgement.raw, time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
