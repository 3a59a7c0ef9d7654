"""HAT retrieval demo (Gradio). Placeholder until the demo app lands: it checks the install."""

import sys

import hat


def main() -> int:
    print(f"hat {hat.__version__} is installed; presets: {', '.join(hat.list_presets())}.")
    print("The interactive demo is not built yet; see README.md for the library and CLIs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
