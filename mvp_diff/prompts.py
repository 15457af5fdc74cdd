"""The location sentence shared by Stage 1 (real anomalies) and Stage 3 (random boxes)."""

LOCATIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

# Thresholds on (box area / image area); the largest box of a sample decides.
SIZE_WORDS = ((0.01, "tiny"), (0.04, "small"), (0.12, "medium"), (float("inf"), "large"))

NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def defect_words(defect_type: str) -> str:
    """`broken_large` -> `broken large`."""
    return " ".join(defect_type.replace("-", "_").split("_")).strip()


def class_words(classname: str) -> str:
    return defect_words(classname)


def location_phrase(box, width, height) -> str:
    """Cell of a 3x3 grid that holds the box centre: `top left` ... `center` ... `bottom right`."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    col = min(2, max(0, int(3 * cx / width)))
    row = min(2, max(0, int(3 * cy / height)))
    return LOCATIONS[row][col]


def size_word(box, width, height) -> str:
    x0, y0, x1, y1 = box
    ratio = max(0, x1 - x0) * max(0, y1 - y0) / float(width * height)
    for limit, word in SIZE_WORDS:
        if ratio < limit:
            return word
    return SIZE_WORDS[-1][1]


def describe(classname, defect_type, boxes, width, height) -> str:
    """`a bottle with a small broken large defect at the top left`.

    Several boxes: the count, the size of the largest and every distinct location in reading order,
    e.g. `a grid with two tiny thread defects at the top left and center`.
    """
    if not boxes:
        raise ValueError("describe() needs at least one box")
    n = len(boxes)
    largest = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    order = {word: i for i, word in enumerate(w for row in LOCATIONS for w in row)}
    places = sorted({location_phrase(b, width, height) for b in boxes}, key=order.__getitem__)
    where = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
    count = NUMBER_WORDS.get(n, str(n))
    noun = "defect" if n == 1 else "defects"
    return f"a {class_words(classname)} with {count} {size_word(largest, width, height)} {defect_words(defect_type)} {noun} at the {where}"
