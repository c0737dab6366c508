"""The shapes world, rayreward's own testbed, in its own wing:

- `world`: seeded scenes of one to three shapes, drawn and captioned from one description, and
  the word-level tokenizer of its captions;
- `pretrain`: `rayreward pretrain`, a small SD-1.x pipeline of the real diffusers classes trained
  from scratch on the world (the shipped `model.name: shapes`);
- `judge`: a small CNN that reads a picture back into its caption's labels (the
  `shapes_alignment` reward);
- `config`: `rayreward pretrain`'s settings.

Nothing outside this package depends on it but the `shapes_alignment` reward, the config's check
that its prompts are captions of the world, and the CLI's `pretrain` command.
"""
