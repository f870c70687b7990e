"""Regenerate `tiny_tokenizer.json`, the embedded tiny model's tokenizer (committed; run only to change it).

A byte-level BPE (never an unknown byte) trained with the `tokenizers` library on a fixed corpus: the Vicuna-v1
template, the words of the embedded sample set's task templates, and digits/punctuation. Output is committed so
every machine loads the same file; BPE training itself is not guaranteed deterministic across processes.

    python pipeline/demo/assets/make_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the user's questions. USER: ASSISTANT:
What digit is written in the image? Which handwritten digit is shown? Answer with a single number.
What is the colour of the shape? What color is the object? Name the colour.
How many shapes are in the image? Count the objects. How many circles squares triangles are there?
Is there a red circle in the image? Is there a blue square in the picture? Answer yes or no. Yes No yes no
Where is the shape? Is it on the left, right, top, bottom or center of the image? left right top bottom center
What word is written in the image? Read the text in the image. What letter is shown?
Which shape is shown? circle square triangle cross star ring bar
red green blue yellow purple orange white black gray cyan magenta pink brown
zero one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 10
Is the digit even or odd? even odd. Is the shape larger than the other? bigger smaller larger same size
Describe the image. There is a small large big tiny shape on a dark light background.
Give a short answer. The answer is Please answer the question. Explain briefly.
the a an is are of in on to and or with what which how many where there this that it image picture photo
Tell me a fact. Write a short sentence about a cat dog bird car tree house sun moon.
"""


def main():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln for ln in CORPUS.splitlines() if ln.strip()] * 4
    tok.train_from_iterator(lines, trainer)
    out = Path(__file__).with_name("tiny_tokenizer.json")
    tok.save(str(out))
    print(f"wrote {out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
