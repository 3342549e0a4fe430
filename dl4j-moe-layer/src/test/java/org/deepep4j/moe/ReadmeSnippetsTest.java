package org.deepep4j.moe;

import org.junit.jupiter.api.Test;

import javax.tools.JavaCompiler;
import javax.tools.JavaFileObject;
import javax.tools.SimpleJavaFileObject;
import javax.tools.StandardJavaFileManager;
import javax.tools.ToolProvider;
import java.io.File;
import java.io.StringWriter;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

/**
 * The top-level README as a newcomer reads it: every Java snippet compiles exactly as written (its imports included,
 * against this module's classpath), and the Maven coordinates it gives are the project's.
 */
class ReadmeSnippetsTest {

    private static final Path README = Path.of("..", "README.md");

    private static String readme() throws Exception {
        return Files.readString(README, StandardCharsets.UTF_8);
    }

    /** A snippet as a class: its imports on top, its statements in a method that is given {@code data}. */
    private static JavaFileObject asClass(String name, String snippet) {
        StringBuilder imports = new StringBuilder();
        StringBuilder body = new StringBuilder();
        for (String line : snippet.split("\n")) {
            (line.startsWith("import ") ? imports : body).append(line).append('\n');
        }
        String src = imports + "public class " + name + " {\n"
                + "  public static void snippet(org.nd4j.linalg.dataset.DataSet data) throws Exception {\n" + body
                + "  }\n}\n";
        return new SimpleJavaFileObject(URI.create("string:///" + name + ".java"), JavaFileObject.Kind.SOURCE) {
            @Override
            public CharSequence getCharContent(boolean ignoreEncodingErrors) {
                return src;
            }
        };
    }

    @Test
    void everyJavaSnippetCompilesAsWritten(@org.junit.jupiter.api.io.TempDir File out) throws Exception {
        Matcher m = Pattern.compile("```java\n(.*?)```", Pattern.DOTALL).matcher(readme());
        List<JavaFileObject> sources = new ArrayList<>();
        while (m.find()) {
            sources.add(asClass("ReadmeSnippet" + sources.size(), m.group(1)));
        }
        assertEquals(3, sources.size(), "the README's Java snippets (ops + SameDiff, DL4J, DL4J graph)");
        JavaCompiler javac = ToolProvider.getSystemJavaCompiler();
        StringWriter errors = new StringWriter();
        try (StandardJavaFileManager files = javac.getStandardFileManager(null, null, StandardCharsets.UTF_8)) {
            boolean ok = javac.getTask(errors, files, null, List.of("-d", out.getPath(), "-classpath",
                    System.getProperty("java.class.path"), "-proc:none"), null, sources).call();
            assertTrue(ok, "README snippets do not compile:\n" + errors);
        }
    }

    @Test
    void mavenCoordinatesAreTheProjects() throws Exception {
        String pom = Files.readString(Path.of("pom.xml"), StandardCharsets.UTF_8);
        Matcher v = Pattern.compile("<version>([^<]+)</version>").matcher(pom);
        assertTrue(v.find());
        String text = readme();
        assertTrue(text.contains("<groupId>org.deepep4j</groupId><artifactId>dl4j-moe-layer</artifactId><version>"
                + v.group(1) + "</version>"), "README's dependency snippet names org.deepep4j:dl4j-moe-layer:" + v.group(1));
        assertTrue(text.contains("<artifactId>nd4j-native</artifactId><version>1.0.0-M2.1</version><classifier>"
                + "linux-x86_64</classifier>"), "README says which ND4J backend to add");
    }
}
