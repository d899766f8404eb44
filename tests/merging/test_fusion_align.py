"""Token alignment across tokenizers: hand-made sequences and vocabularies with known answers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from merging.fusion.align import (
    BYTE_LEVEL,
    DROPPED,
    EDIT,
    EXACT,
    PLAIN,
    SENTENCEPIECE,
    Vocabulary,
    align_tokens,
    map_vocabulary,
    normalize_token,
    token_starts,
    token_style,
)
from merging.testbed.tokenizers_build import bpe_tokenizer, char_tokenizer


@pytest.mark.parametrize(
    ("token", "style", "text"),
    [
        ("\u0120the", BYTE_LEVEL, " the"),  # Ġ: space
        ("\u010a", BYTE_LEVEL, "\n"),  # Ċ: newline
        ("\u00c3\u00a9", BYTE_LEVEL, "é"),  # the two UTF-8 bytes of é
        ("\u2581the", SENTENCEPIECE, " the"),
        ("<0x0A>", SENTENCEPIECE, "\n"),
        ("\u0120x", PLAIN, "\u0120x"),
    ],
)
def test_markers_become_the_text_they_stand_for(token, style, text):
    assert normalize_token(token, style) == text


def test_token_style_is_read_from_the_tokenizer():
    assert token_style(char_tokenizer()) == PLAIN
    assert token_style(bpe_tokenizer(["a b c", "ab bc"], 280)) == BYTE_LEVEL
    piece = Tokenizer(models.WordLevel({"<unk>": 0, "\u2581a": 1}, unk_token="<unk>"))
    piece.pre_tokenizer = pre_tokenizers.Metaspace()
    assert token_style(PreTrainedTokenizerFast(tokenizer_object=piece, unk_token="<unk>")) == SENTENCEPIECE


def test_a_split_token_gives_its_distribution_to_the_first_piece_only():
    path = align_tokens(["12", " 3"], ["1", "2", " ", "3"])
    assert path == [(0, 0), (0, 1), (1, 2), (1, 3)]
    assert token_starts(path) == {0: 0, 2: 1}


def test_merged_tokens_give_the_first_source_token():
    path = align_tokens(["1", "2", " ", "3"], ["12", " 3"])
    assert path == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert token_starts(path) == {0: 0, 1: 2}


def test_an_inserted_target_token_takes_no_distribution():
    # "ab" against "a b": the edit script inserts the space, which belongs to no source token
    path = align_tokens(["a", "b"], ["a", " ", "b"])
    assert path == [(0, 0), (1, 2)]
    assert token_starts(path) == {0: 0, 2: 1}


def test_the_characters_of_a_long_token_stay_with_it():
    # a token-level DTW would pair "s", "c", ... with ":" (one edit each instead of eight)
    source = ["ascending", ":", " 1"]
    target = list("ascending: 1")
    path = align_tokens(source, target)
    assert path == [(0, j) for j in range(9)] + [(1, 9), (2, 10), (2, 11)]
    assert token_starts(path) == {0: 0, 9: 1, 10: 2}


def test_an_unknown_token_matches_what_stands_in_its_place():
    path = align_tokens(["a", "é", "b"], ["a", "", "b"], target_wildcards=[False, True, False])
    assert path == [(0, 0), (1, 1), (2, 2)]
    assert token_starts(path) == {0: 0, 1: 1, 2: 2}


def test_empty_sequences_align_to_nothing():
    assert align_tokens([], ["a"]) == []


def _char_vocabulary() -> Vocabulary:
    strings = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", 4: " ", 5: "\n", 6: "1", 7: "a", 8: "b", 9: "ab"}
    return Vocabulary(PLAIN, strings, {"pad": 0, "bos": 1, "eos": 2, "unk": 3})


def test_vocabulary_maps_exactly_then_by_edit_distance_then_drops():
    source = Vocabulary(
        BYTE_LEVEL,
        {5: "\u012012", 6: "\u010a", 7: "ab", 8: "xyz", 9: "</s>", 10: "<unk>"},
        {"eos": 9, "unk": 10},
    )
    mapping = map_vocabulary(source, _char_vocabulary(), [5, 6, 7, 8, 9, 10])
    # " 12": distance 2 to " " and to "1"; " " shares the longer prefix
    assert mapping[5] == (4, EDIT)
    assert mapping[6] == (5, EXACT)
    assert mapping[7] == (9, EXACT)
    assert mapping[8] == (-1, DROPPED)  # "xyz" is 3 edits from every target text
    assert mapping[9] == (2, EXACT)  # end of sequence by role
    assert mapping[10] == (-1, DROPPED)  # unknown carries nothing


def test_equal_distance_and_prefix_ties_go_to_the_lower_id():
    target = Vocabulary(PLAIN, {0: "xb", 1: "xa", 2: "q"}, {})
    source = Vocabulary(PLAIN, {7: "xc"}, {})
    assert map_vocabulary(source, target, [7])[7] == (0, EDIT)


def test_vocabulary_from_a_tokenizer_knows_its_special_tokens():
    vocabulary = Vocabulary.from_tokenizer(char_tokenizer())
    assert vocabulary.roles[vocabulary.specials["eos"]] == "eos"
    assert vocabulary.by_text["a"] == char_tokenizer().convert_tokens_to_ids("a")
    assert "</s>" not in vocabulary.by_text
