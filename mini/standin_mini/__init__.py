"""The mini world: a procedural world of cartoon people, small enough to run the whole Stand-In pipeline on a laptop.

world.py     identities (NUM_IDENTITIES attribute combinations), rendering with exact face boxes/landmarks, scenery
prompts.py   the prompt grammar: sample, print, parse ("A child waves on a beach at noon.")
data.py      clips that act out their prompt, reference photos, train/test splits, MiniClipDataset
identity.py  the world's face recogniser (MiniFaceBackend: detector + embedder) and check_prompt
train_identity.py  trains and evaluates it (resumable); weights/ holds the shipped result
sheet.py     contact sheets of identities and clips
"""
