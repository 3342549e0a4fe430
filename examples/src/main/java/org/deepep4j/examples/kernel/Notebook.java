package org.deepep4j.examples.kernel;

import io.github.spencerpark.jupyter.kernel.display.DisplayData;
import java.io.IOException;
import java.util.Base64;
import org.knowm.xchart.BitmapEncoder;
import org.knowm.xchart.internal.chartpart.Chart;

/** What notebook cells call to show rich output inline. */
public final class Notebook {
    private Notebook() {}

    /** Shows an XChart chart as an inline PNG image. */
    public static void show(Chart<?, ?> chart) throws IOException {
        showPng(BitmapEncoder.getBitmapBytes(chart, BitmapEncoder.BitmapFormat.PNG));
    }

    /** Shows PNG bytes as an inline image. */
    public static void showPng(byte[] png) {
        JavaKernel kernel = JavaKernel.current();
        if (kernel == null) throw new IllegalStateException("Notebook.show needs the deepep4j Java kernel; none is running");
        DisplayData data = new DisplayData();
        data.putData("image/png", Base64.getEncoder().encodeToString(png));
        kernel.display(data);
    }
}
