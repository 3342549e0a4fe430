package org.deepep4j.examples;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.github.spencerpark.jupyter.kernel.display.DisplayData;
import io.github.spencerpark.jupyter.kernel.display.mime.MIMEType;
import org.deepep4j.examples.kernel.JavaKernel;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The kernel's cell evaluation, without Jupyter: values, state across cells, compile and runtime errors. */
class JavaKernelTest {
    private static JavaKernel kernel;

    @BeforeAll
    static void start() {
        kernel = new JavaKernel();
    }

    @AfterAll
    static void stop() {
        kernel.onShutdown(false);
    }

    @Test
    void lastExpressionIsTheCellValueAndStateCarriesOver() throws Exception {
        assertNull(kernel.eval("int a = 20;\nint b = a + 1;"));
        DisplayData v = kernel.eval("String s = \"x\";\nb * 2");
        assertEquals("42", v.getData(MIMEType.TEXT_PLAIN));
    }

    @Test
    void projectClassesAreOnTheClasspath() throws Exception {
        DisplayData v = kernel.eval("org.deepep4j.examples.Options.parse(\"--experts\", \"16\").expertsPerRank()");
        assertEquals("8", v.getData(MIMEType.TEXT_PLAIN));
    }

    @Test
    void compileErrorNamesTheProblem() {
        Exception e = assertThrows(Exception.class, () -> kernel.eval("int c = ;"));
        assertTrue(e.getMessage().startsWith("does not compile"), e.getMessage());
    }

    @Test
    void runtimeErrorCarriesTheUsersException() {
        Exception e = assertThrows(Exception.class, () -> kernel.eval("throw new IllegalStateException(\"boom\");"));
        assertEquals("java.lang.IllegalStateException: boom", e.getMessage());
    }
}
