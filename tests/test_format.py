from __future__ import annotations

import random

from bot.format import split_message


def _renders_as_code_balanced(part: str) -> bool:
    return sum(1 for line in part.split("\n") if line.strip().startswith("```")) % 2 == 0


def test_short_text_is_one_part() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("   ") == []


def test_long_reply_with_code_block_splits_and_refences() -> None:
    prose = "\n\n".join(f"Paragraph {i}. " + "Some words here. " * 12 for i in range(8))
    code = "```python\n" + "\n".join(f"print('line {i}')  # {'x' * 30}" for i in range(70)) + "\n```"
    text = prose + "\n\n" + code + "\n\nThat's all."
    assert len(text) > 5000
    parts = split_message(text)
    assert len(parts) >= 3
    assert all(len(p) <= 2000 for p in parts)
    assert all(_renders_as_code_balanced(p) for p in parts)
    code_parts = [p for p in parts if "print(" in p]
    assert len(code_parts) >= 2
    for p in code_parts[1:]:
        assert p.startswith("```python\n")  # reopened with its language
    # nothing lost or reordered, apart from the added fences
    rebuilt = "\n".join(parts)
    for i in range(60):
        assert f"print('line {i}')" in rebuilt
    assert rebuilt.index("line 10'") < rebuilt.index("line 50'")
    assert parts[-1].endswith("That's all.")


def test_prefers_paragraph_breaks() -> None:
    text = "A" * 900 + "\n\n" + "B" * 900 + "\n\n" + "C" * 900
    parts = split_message(text)
    assert parts == ["A" * 900 + "\n\n" + "B" * 900, "C" * 900]


def test_unbroken_text_and_unclosed_fence() -> None:
    parts = split_message("z" * 4500)
    assert all(len(p) <= 2000 for p in parts) and "".join(parts) == "z" * 4500
    parts = split_message("```\n" + "code line\n" * 400)
    assert all(len(p) <= 2000 and _renders_as_code_balanced(p) for p in parts)


def test_random_texts_respect_the_limit() -> None:
    rng = random.Random(7)
    words = ["word", "```", "```js", "\n", "\n\n", "x" * 300, "longer_token" * 20]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 600)))
        for p in split_message(text):
            assert 0 < len(p) <= 2000
