"""S-11 merge tags: {variable}, XYZ<FIELD>XYZ, [Unsubscribe], [WebVersion]."""

from twisted.trial import unittest

from mailgw.content.merge import escape_for_html, merge

LINKS = {"unsubscribe": "https://m.example/u/1", "webversion": "https://m.example/w/1"}


class MergeTests(unittest.TestCase):
    def test_variables(self):
        variables = {"nombre": "Ana", "var 3": "tres", "var-5-5": "cinco", "a_b": "ab"}
        self.assertEqual(merge("Hola {nombre}, {var 3} {var-5-5} {a_b}", variables, {}, {}),
                         "Hola Ana, tres cinco ab")

    def test_variable_names_are_exact(self):
        self.assertEqual(merge("{Nombre} { nombre } {nombre }", {"nombre": "Ana"}, {}, {}),
                         "{Nombre} { nombre } {nombre }")

    def test_fields_ignore_case(self):
        fields = {"Nombre": "Juan", "TAG-CURL": "x", "DNI": "21232421"}
        text = "XYZnombreXYZ XYZNOMBREXYZ XYZtag-curlXYZ XYZDNIXYZ"
        self.assertEqual(merge(text, {}, fields, {}), "Juan Juan x 21232421")

    def test_links(self):
        text = '<a href="[Unsubscribe]">baja</a> <a href="[WebVersion]">web</a> [unsubscribe]'
        self.assertEqual(merge(text, {}, {}, LINKS),
                         '<a href="https://m.example/u/1">baja</a> '
                         '<a href="https://m.example/w/1">web</a> https://m.example/u/1')

    def test_unknown_tags_left_as_written(self):
        text = "{desconocido} XYZfooXYZ [Something] [Unsubscribe] {} XYZXYZ [] {a:b}"
        self.assertEqual(merge(text, {"x": "1"}, {"bar": "2"}, {}), text)

    def test_css_untouched(self):
        style = ("<style>\np { color: red; }\n.a{color:red}\n@media (max-width:600px) {\n"
                 "  .b { display: none }\n}\ninput[type] {x:y}\n</style>")
        self.assertEqual(merge(style, {"color": "blue", "x": "1"}, {}, LINKS), style)

    def test_values_are_not_merged_again(self):
        self.assertEqual(merge("{a} XYZbXYZ", {"a": "{c}", "c": "no"}, {"b": "[Unsubscribe]"},
                               LINKS), "{c} [Unsubscribe]")

    def test_all_kinds_in_one_pass(self):
        text = "Hola {nombre} XYZAPELLIDOXYZ, baja: [Unsubscribe]"
        self.assertEqual(merge(text, {"nombre": "Ana"}, {"apellido": "Pérez"}, LINKS),
                         "Hola Ana Pérez, baja: https://m.example/u/1")

    def test_escape_for_html(self):
        self.assertEqual(escape_for_html({"a": '<b>"x" & y</b>'}),
                         {"a": "&lt;b&gt;&quot;x&quot; &amp; y&lt;/b&gt;"})
        self.assertEqual(merge("<p>{a}</p>", escape_for_html({"a": "<script>"}), {}, {}),
                         "<p>&lt;script&gt;</p>")
