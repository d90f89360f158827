"""The mini world (package standin-mini): a procedural world of cartoon people, small enough to run the whole
Stand-In pipeline on a laptop. It depends on standin; standin finds it only through its entry points (mini in
standin.models, standin.face_backends, standin.datasets and standin.commands, see mini/pyproject.toml).

world.py     identities (NUM_IDENTITIES attribute combinations), rendering with exact face boxes/landmarks, scenery
prompts.py   the prompt grammar: sample, print, parse ("A child waves on a beach at noon.")
data.py      clips that act out their prompt, reference photos, train/test splits, MiniClipDataset, mini_dataset
identity.py  the world's face recogniser (MiniFaceBackend: detector + embedder) and check_prompt
train_identity.py  trains and evaluates it (resumable); weights/ holds the shipped result
model.py, train_base.py  the embedded mini model (weights/base, weights/standin_adapter.safetensors) and its training
prepare.py   the world pre-encoded for `standin train`; evaluate.py the results table
sheet.py     contact sheets of identities and clips
settings.py  paths, clip format and settings, light to import; cli.py  `standin mini ...`
"""
