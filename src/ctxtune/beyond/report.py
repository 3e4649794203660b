"""placeholder"""


def beyond_section(results_dir: object) -> str:
    return ""
