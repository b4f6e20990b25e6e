"""The curated calibration sample of the ``any4-g128-rtn-curated`` row of bench/quality_formats.py."""

# A short, diverse calibration text (prose, dialogue, code, numbers, lists, other languages), in
# the spirit of the any4 paper's single curated calibration sample; written for quantkit.
CURATED_CALIBRATION_TEXT = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined \
movable metal type, oil-based ink and a wooden screw press into a system that could produce books \
far faster than scribes. Within fifty years, presses operated in more than two hundred European \
cities, and the price of a book fell by roughly two thirds.

"Are you coming to the station tomorrow?" she asked. "The train leaves at 7:45, and I don't want to \
miss it again." He laughed, poured another cup of coffee and said, "I'll be there by seven. Promise."

def fibonacci(n: int) -> list[int]:
    a, b, out = 0, 1, []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

print(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]

SELECT name, COUNT(*) AS orders FROM customers JOIN sales ON customers.id = sales.customer_id \
GROUP BY name ORDER BY orders DESC LIMIT 5;

Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2. The \
reaction takes place in the chloroplasts, where chlorophyll absorbs mostly blue and red light. The \
derivative of x^3 + 2x is 3x^2 + 2, and the integral of 1/x from 1 to e equals 1.

Shopping list: 2 kg of potatoes, 500 g of butter, a dozen eggs, olive oil, fresh basil, three lemons.

Quarterly revenue rose 12.4% to $3.18 billion, while operating margin narrowed from 21% to 19.5% \
because of higher logistics costs in Asia and Latin America.

La ville de Paris compte environ deux millions d'habitants. Der schnelle braune Fuchs springt über \
den faulen Hund. El conocimiento es poder, y la curiosidad es el motor del aprendizaje.

Mount Everest, at 8,849 metres, is the highest mountain above sea level; the Mariana Trench reaches \
about 10,935 metres below it. Light travels 299,792 kilometres per second, so sunlight needs about \
eight minutes and twenty seconds to reach the Earth.

Q: What is the capital of Australia?
A: Canberra, which was chosen as a compromise between Sydney and Melbourne in 1908.

In 1969, Apollo 11 landed on the Moon. Neil Armstrong stepped onto the surface and said, "That's one \
small step for man, one giant leap for mankind." Millions watched the grainy broadcast on television.

<html><body><h1>Welcome</h1><p>Click <a href="/start">here</a> to begin.</p></body></html>

Poetry compresses experience: the autumn wind scatters red leaves across the quiet river, and an old \
boatman hums a song his grandmother taught him, long before the bridge was built.
"""
