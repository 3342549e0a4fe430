package org.deepep4j.natives;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import org.bytedeco.javacpp.Loader;

/**
 * Loads the JNI library (engine linked in) from the classpath, or from the folder named by the system property
 * {@value #DIR_PROPERTY}. A failure says which platform, which path was tried and why.
 */
public final class NativeLoader {
  /** System property: a folder holding the JNI library, used instead of the classpath. */
  public static final String DIR_PROPERTY = "deepep4j.native.dir";
  static final String LIBRARY = "jniDeepEp4jNative";

  private static boolean loaded;

  private NativeLoader() {}

  static synchronized void load() {
    if (loaded) return;
    String dir = System.getProperty(DIR_PROPERTY);
    if (dir != null) {
      loadFromDirectory(Paths.get(dir));
    } else {
      try {
        Loader.load(DeepEp4jNative.class);
      } catch (Throwable t) {
        throw failure("classpath resource " + classpathResource(), t.toString());
      }
    }
    loaded = true;
  }

  /** Loads the JNI library from {@code dir}; throws {@link UnsatisfiedLinkError} naming platform, path and cause. */
  public static void loadFromDirectory(Path dir) {
    Path lib = dir.resolve(System.mapLibraryName(LIBRARY));
    if (!Files.isRegularFile(lib)) throw failure(lib.toAbsolutePath().toString(), "no such file");
    try {
      System.load(lib.toAbsolutePath().toString());
    } catch (UnsatisfiedLinkError e) {
      throw failure(lib.toAbsolutePath().toString(), e.getMessage());
    }
  }

  static String classpathResource() {
    return "/org/deepep4j/natives/" + Loader.getPlatform() + "/" + System.mapLibraryName(LIBRARY);
  }

  private static UnsatisfiedLinkError failure(String tried, String why) {
    return new UnsatisfiedLinkError(
        "deepep4j native library not found for platform " + Loader.getPlatform() + ": tried " + tried + ": " + why
            + ". The jar of nd4j-deepep-ops carries it for linux-x86_64 only; set -D" + DIR_PROPERTY
            + "=<folder> to load " + System.mapLibraryName(LIBRARY) + " from elsewhere.");
  }
}
