package org.deepep4j.examples.kernel;

import java.io.IOException;
import java.net.URISyntaxException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Collectors;

/**
 * Installs the kernelspec "deepep4j-java" so Jupyter can start {@link JavaKernel} from this jar:
 * {@code java -cp examples/target/deepep4j-examples.jar org.deepep4j.examples.kernel.InstallKernel [--dir DIR]}.
 * Without --dir it goes to the user's Jupyter data dir ($JUPYTER_DATA_DIR or ~/.local/share/jupyter); with --dir DIR it
 * goes to DIR/kernels, for use with JUPYTER_PATH=DIR.
 */
public final class InstallKernel {
    public static final String NAME = "deepep4j-java";

    private InstallKernel() {}

    public static void main(String[] args) throws Exception {
        Path base;
        if (args.length == 0) {
            String env = System.getenv("JUPYTER_DATA_DIR");
            base = env != null ? Path.of(env) : Path.of(System.getProperty("user.home"), ".local", "share", "jupyter");
        } else if (args.length == 2 && args[0].equals("--dir")) {
            base = Path.of(args[1]);
        } else {
            System.err.println("usage: InstallKernel [--dir DIR]   (default: $JUPYTER_DATA_DIR or ~/.local/share/jupyter)");
            System.exit(2);
            return;
        }
        System.out.println("installed kernel '" + NAME + "' in " + install(base));
    }

    /** Writes base/kernels/deepep4j-java/kernel.json pointing at this jar; returns the kernel's folder. */
    public static Path install(Path base) throws IOException, URISyntaxException {
        Path jar = Path.of(JavaKernel.class.getProtectionDomain().getCodeSource().getLocation().toURI()).toAbsolutePath();
        Path java = Path.of(System.getProperty("java.home"), "bin", "java");
        List<String> argv = List.of(java.toString(), "-Djava.awt.headless=true", "-Xmx2g", "-cp", jar.toString(),
                JavaKernel.class.getName(), "{connection_file}");
        String json = "{\n  \"argv\": [" + argv.stream().map(InstallKernel::quote).collect(Collectors.joining(", "))
                + "],\n  \"display_name\": \"Java (deepep4j)\",\n  \"language\": \"java\",\n"
                + "  \"interrupt_mode\": \"message\"\n}\n";
        Path dir = base.resolve("kernels").resolve(NAME);
        Files.createDirectories(dir);
        Files.writeString(dir.resolve("kernel.json"), json);
        return dir;
    }

    private static String quote(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
    }
}
