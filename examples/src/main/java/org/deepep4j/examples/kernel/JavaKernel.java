package org.deepep4j.examples.kernel;

import io.github.spencerpark.jupyter.channels.JupyterConnection;
import io.github.spencerpark.jupyter.kernel.BaseKernel;
import io.github.spencerpark.jupyter.kernel.KernelConnectionProperties;
import io.github.spencerpark.jupyter.kernel.LanguageInfo;
import io.github.spencerpark.jupyter.kernel.display.DisplayData;
import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Set;
import java.util.jar.JarFile;
import java.util.jar.Manifest;
import java.util.stream.Collectors;
import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;

/**
 * A Jupyter kernel for Java: cells are evaluated by JShell in this JVM ("local" execution engine), so notebook code shares
 * the kernel's classpath (this project's jars, ND4J, XChart) and can show images through {@link Notebook}.
 */
public final class JavaKernel extends BaseKernel {
    private static volatile JavaKernel current;
    private final JShell shell;

    public JavaKernel() {
        shell = JShell.builder().executionEngine("local").build();
        for (String entry : classpath()) shell.addToClasspath(entry);
        current = this;
    }

    /** The running kernel, for {@link Notebook#show}; null outside a notebook. */
    static JavaKernel current() {
        return current;
    }

    public static void main(String[] args) throws Exception {
        // The kernel library logs every message at INFO under short names ("ShellChannel", ...): raise the root level.
        java.util.logging.Logger root = java.util.logging.Logger.getLogger("");
        root.setLevel(java.util.logging.Level.WARNING);
        for (java.util.logging.Handler h : root.getHandlers()) h.setLevel(java.util.logging.Level.WARNING);
        if (args.length != 1) {
            System.err.println("usage: JavaKernel <connection file>   (Jupyter starts it; see InstallKernel)");
            System.exit(2);
        }
        KernelConnectionProperties props = KernelConnectionProperties.parse(Files.readString(Path.of(args[0])));
        JupyterConnection connection = new JupyterConnection(props);
        JavaKernel kernel = new JavaKernel();
        kernel.becomeHandlerForConnection(connection);
        connection.connect();
        connection.waitUntilClose();
    }

    @Override
    public LanguageInfo getLanguageInfo() {
        return new LanguageInfo("java", Runtime.version().toString(), "text/x-java-source", ".jshell", "java", "java",
                "script");
    }

    @Override
    public String getBanner() {
        return "Java " + Runtime.version() + " (JShell) with deepep4j";
    }

    /** Evaluates a cell snippet by snippet; the value of a final expression becomes the cell's result. */
    @Override
    public DisplayData eval(String code) throws Exception {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String rest = code;
        String lastValue = null;
        while (!rest.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(rest);
            if (info.completeness() == SourceCodeAnalysis.Completeness.EMPTY) break;
            if (!info.completeness().isComplete()) {
                throw new CellException("incomplete statement at end of cell: " + rest.strip());
            }
            lastValue = evalSnippet(info.source());
            rest = info.remaining();
        }
        return lastValue == null ? null : new DisplayData(lastValue);
    }

    private String evalSnippet(String source) throws Exception {
        String value = null;
        for (SnippetEvent event : shell.eval(source)) {
            if (event.exception() != null) throw describe(event.exception());
            Snippet snippet = event.snippet();
            if (event.status() == Snippet.Status.REJECTED) {
                String diagnostics = shell.diagnostics(snippet)
                        .map(d -> describe(d, snippet.source()))
                        .collect(Collectors.joining("\n"));
                CellException c = new CellException("does not compile:\n" + diagnostics);
                c.setStackTrace(new StackTraceElement[0]);
                throw c;
            }
            if (event.causeSnippet() == null && event.value() != null && isExpression(snippet)) value = event.value();
        }
        return value;
    }

    private static boolean isExpression(Snippet s) {
        return s.kind() == Snippet.Kind.EXPRESSION || s.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND;
    }

    private static CellException describe(Exception e) {
        if (e instanceof UnresolvedReferenceException u) {
            CellException c = new CellException("unresolved reference in " + u.getSnippet().source().strip());
            c.setStackTrace(new StackTraceElement[0]);
            return c;
        }
        String type = e instanceof EvalException ee ? ee.getExceptionClassName() : e.getClass().getName();
        CellException c = new CellException(type + ": " + e.getMessage());
        // Keep the user's frames: those above JShell's own machinery.
        List<StackTraceElement> frames = new ArrayList<>();
        for (StackTraceElement el : e.getStackTrace()) {
            if (el.getClassName().startsWith("jdk.jshell") || el.getClassName().startsWith("jdk.internal")) break;
            frames.add(el);
        }
        c.setStackTrace(frames.toArray(new StackTraceElement[0]));
        if (e.getCause() != null) c.initCause(e.getCause());
        return c;
    }

    private static String describe(Diag d, String source) {
        int line = 1;
        for (int i = 0; i < d.getStartPosition() && i < source.length(); i++) if (source.charAt(i) == '\n') line++;
        return "  line " + line + ": " + d.getMessage(null);
    }

    @Override
    public List<String> formatError(Exception e) {
        List<String> lines = new ArrayList<>();
        lines.add(errorStyler.primary(e.getMessage()));
        for (StackTraceElement el : e.getStackTrace()) {
            lines.add(errorStyler.secondary("    at " + el));
        }
        for (Throwable c = e.getCause(); c != null; c = c.getCause()) lines.add(errorStyler.secondary("  caused by: " + c));
        return lines;
    }

    @Override
    public void interrupt() {
        shell.stop();
    }

    @Override
    public void onShutdown(boolean isRestarting) {
        shell.close();
    }

    /**
     * This JVM's classpath with every jar's manifest Class-Path expanded: the examples jar lists its dependencies there,
     * and JShell's compiler needs them spelled out.
     */
    static List<String> classpath() {
        Set<String> out = new LinkedHashSet<>();
        for (String entry : System.getProperty("java.class.path").split(File.pathSeparator)) addWithManifest(entry, out);
        return new ArrayList<>(out);
    }

    private static void addWithManifest(String entry, Set<String> out) {
        if (entry.isBlank() || !out.add(entry) || !entry.endsWith(".jar")) return;
        File jar = new File(entry);
        try (JarFile jf = new JarFile(jar)) {
            Manifest m = jf.getManifest();
            String cp = m == null ? null : m.getMainAttributes().getValue("Class-Path");
            if (cp == null) return;
            // Entries are URIs relative to the jar's folder (Maven's jar plugin) or absolute file: URIs (Surefire).
            for (String rel : cp.trim().split("\\s+")) {
                addWithManifest(Path.of(jar.getAbsoluteFile().getParentFile().toURI().resolve(rel)).toString(), out);
            }
        } catch (IOException | IllegalArgumentException e) {
            // Not a readable jar: JShell will report what it cannot load.
        }
    }

    /** An error in a cell, shown to the user without the kernel's own stack frames. */
    static final class CellException extends Exception {
        CellException(String message) {
            super(message);
        }
    }
}
