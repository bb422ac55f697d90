"""Evidence setup: a byte-level BPE tokenizer (1,024 tokens) trained on the corpus, and an untrained
small GPT-2 (4 layers, 128 wide, context 128) saved with it."""
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

root = Path(sys.argv[1])
files = sorted(str(p) for p in (root / "corpus").glob("*.py"))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train(files, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
torch.manual_seed(0)
eos = tok.token_to_id("<|endoftext|>")
config = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=128, vocab_size=tok.get_vocab_size(),
                                 bos_token_id=eos, eos_token_id=eos)
model = transformers.GPT2LMHeadModel(config)
model.save_pretrained(root / "gpt")
tok.save(str(root / "gpt" / "tokenizer.json"))
print(sum(p.numel() for p in model.parameters()), "parameters;", tok.get_vocab_size(), "tokens")
