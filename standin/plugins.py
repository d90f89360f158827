"""What other installed packages add to standin, found through entry points (importlib.metadata), never by
import name. standin depends on none of them; each registers under one of these groups:

    standin.models         name -> zero-argument callable returning {"base": folder, "adapter": file}; the one
                           named "mini" is what `standin generate` uses without --base
    standin.face_backends  name -> a FaceBackend class, built without arguments (standin.faces.get_backend)
    standin.datasets       name -> callable(split, length, num_frames, height, width, reference_size) returning a
                           torch Dataset of pixel samples with a `settings` dict (num_frames, height, width, fps)
    standin.commands       name -> a module with add_parser(subparsers) (more `standin` subcommands)

The embedded mini model and its world (`pip install -e mini/`, package standin-mini) register "mini" in each.
"""

from importlib.metadata import EntryPoint, entry_points

MODELS = "standin.models"
FACE_BACKENDS = "standin.face_backends"
DATASETS = "standin.datasets"
COMMANDS = "standin.commands"

DEFAULT_MODEL = "mini"


def registered(group: str) -> dict[str, EntryPoint]:
    """The installed entry points of a group by name (the first one of a name if two packages register it)."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=group):
        found.setdefault(entry.name, entry)
    return found


def names(group: str) -> list[str]:
    return sorted(registered(group))


def load(group: str, name: str):
    """The object an entry point names, or None when no installed package registers `name` in `group`."""
    entry = registered(group).get(name)
    return None if entry is None else entry.load()
