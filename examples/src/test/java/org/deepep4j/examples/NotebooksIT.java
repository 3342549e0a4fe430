package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.stream.Stream;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.DynamicTest;
import org.junit.jupiter.api.TestFactory;
import org.junit.jupiter.api.io.TempDir;

/**
 * Executes every notebook in examples/notebooks headless with {@code jupyter nbconvert --execute} on the project's Java
 * kernel (installed into a temporary Jupyter path by the documented InstallKernel command) and fails on any cell error.
 */
class NotebooksIT {
    private static final long NOTEBOOK_TIMEOUT_MIN = 8;

    @TempDir
    static Path work;

    private static Path jar;
    private static Path notebooks;

    @BeforeAll
    static void installKernel() throws Exception {
        jar = Path.of(System.getProperty("deepep4j.examples.jar", "target/deepep4j-examples.jar")).toAbsolutePath();
        notebooks = Path.of(System.getProperty("deepep4j.notebooks.dir", "notebooks")).toAbsolutePath();
        assertTrue(Files.isRegularFile(jar), "examples jar " + jar + " is missing: run mvn package first");
        Run which = run(List.of("jupyter", "nbconvert", "--version"), 60);
        if (which.code != 0) {
            fail("jupyter nbconvert is not installed (" + which.output.strip() + "); run examples/notebooks/install-deps.sh"
                    + " or skip with -Ddeepep4j.notebooks.skip=true");
        }
        String java = Path.of(System.getProperty("java.home"), "bin", "java").toString();
        Run install = run(List.of(java, "-cp", jar.toString(), "org.deepep4j.examples.kernel.InstallKernel",
                "--dir", work.resolve("jupyter").toString()), 60);
        assertEquals(0, install.code, install.output);
        assertTrue(Files.isRegularFile(work.resolve("jupyter/kernels/deepep4j-java/kernel.json")), install.output);
    }

    @TestFactory
    Stream<DynamicTest> everyNotebookRunsWithoutCellErrors() throws IOException {
        List<Path> found;
        try (Stream<Path> s = Files.list(notebooks)) {
            found = s.filter(p -> p.toString().endsWith(".ipynb")).sorted().toList();
        }
        assertFalse(found.isEmpty(), "no notebooks in " + notebooks);
        return found.stream().map(nb -> DynamicTest.dynamicTest(nb.getFileName().toString(), () -> execute(nb)));
    }

    private static void execute(Path notebook) throws Exception {
        Path outDir = work.resolve("executed");
        Files.createDirectories(outDir);
        Run r = run(List.of("jupyter", "nbconvert", "--execute", "--to", "notebook",
                "--ExecutePreprocessor.timeout=" + NOTEBOOK_TIMEOUT_MIN * 60, "--ExecutePreprocessor.kernel_name=deepep4j-java",
                "--output-dir", outDir.toString(), notebook.toString()), NOTEBOOK_TIMEOUT_MIN * 60 + 60);
        assertEquals(0, r.code, "notebook " + notebook.getFileName() + " failed:\n" + r.output);
        String executed = Files.readString(outDir.resolve(notebook.getFileName()));
        assertFalse(executed.contains("\"output_type\": \"error\""), "a cell of " + notebook.getFileName() + " failed");
        // Every notebook shows at least one result or printed line; an empty run would mean the kernel ran nothing.
        assertTrue(executed.contains("\"output_type\": \"stream\"") || executed.contains("\"output_type\": \"execute_result\""),
                "no cell output in executed " + notebook.getFileName());
    }

    private record Run(int code, String output) {}

    private static Run run(List<String> command, long timeoutSeconds) throws IOException, InterruptedException {
        ProcessBuilder pb = new ProcessBuilder(command).redirectErrorStream(true);
        pb.environment().put("JUPYTER_PATH", work.resolve("jupyter").toString());
        Path log = Files.createTempFile(work, "run", ".log");
        pb.redirectOutput(log.toFile());
        Process p;
        try {
            p = pb.start();
        } catch (IOException e) {
            return new Run(127, command.get(0) + ": " + e.getMessage());
        }
        if (!p.waitFor(timeoutSeconds, TimeUnit.SECONDS)) {
            p.descendants().forEach(ProcessHandle::destroyForcibly);
            p.destroyForcibly();
            return new Run(124, "timed out after " + timeoutSeconds + " s: " + String.join(" ", command) + "\n"
                    + Files.readString(log));
        }
        List<String> lines = new ArrayList<>(Files.readAllLines(log));
        // The tail is what explains a failure; nbconvert prints the failing cell and the error last.
        String tail = String.join("\n", lines.subList(Math.max(0, lines.size() - 80), lines.size()));
        return new Run(p.exitValue(), tail);
    }
}
